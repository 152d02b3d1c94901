import pytest
import yaml

from kdistill.config import builtin_recipes, diff_configs, load_recipe, recipe_changes
from kdistill.errors import ConfigError


def base():
    return {
        "name": "t",
        "teacher": {"model": "packaged:all-MiniLM-L6-v2"},
        "student": {"from_teacher": {"layers": [1, 3, 5]}},
        "data": {"train": {"source": "stdlib-docstrings"}},
        "losses": [{"type": "hidden_mse", "weight": 1.0}],
        "train": {"steps": 10},
        "output": "runs/t",
    }


def test_valid_recipe_and_defaults():
    r = load_recipe(base())
    stage = r.stages[0]
    assert r.name == "t" and stage.name == "main" and stage.train.steps == 10
    assert stage.losses[0].type == "hidden_mse" and stage.losses[0].layers == "uniform"


def test_set_overrides_any_field_with_yaml_values():
    r = load_recipe(base(), ["train.steps=2000", "losses.0.weight=0.5", "data.max_length=64",
                             "losses=[{type: embedding_cosine}, {type: attention_kl, layers: last}]"])
    assert r.stages[0].train.steps == 2000 and r.stages[0].data.max_length == 64
    assert [p.type for p in r.stages[0].losses] == ["embedding_cosine", "attention_kl"]


def test_set_takes_list_items_as_the_difference_messages_print_them():
    r = load_recipe(base(), ["losses[0].weight=0.25"])  # as `stages[0].train.lr: ... -> ...` is printed
    assert r.stages[0].losses[0].weight == 0.25


def test_set_without_equals_sign():
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        load_recipe(base(), ["train.steps"])


@pytest.mark.parametrize("override, expected", [
    ("train.stpes=3", "train.stpes: unknown field"),
    ("teacher.modle=x", "did you mean 'model'"),  # two letters swapped, though 'mode' is closer by ratio
    ("teacher.path=store", "teacher: path: and top_k: describe a teacher store; add source: cache"),  # not ignored
    ("teacher.top_k=8", "teacher: path: and top_k: describe a teacher store; add source: cache"),
    ("losses=[{type: logit_kd, chunk_size: auto, alpha: 0.5}]", "losses[0]: chunk_size: the chunked path"),  # on reading
    ("train.lr=abc", "train.lr"),
    ("losses.0.type=hiden_mse", "did you mean 'hidden_mse'"),
    ("losses.0.temperature=2", "losses[0].temperature: unknown field"),
    ("data.train.source=stdlib-docstring", "did you mean 'stdlib-docstrings'"),
    ("train.steps=0", "train.steps"),
    ("losses.0.layers=[]", "losses[0].layers: List should have at least 1 item"),
    ("losses=[{type: embedding_mse, layers: [[0, 0]]}]", "losses[0].layers: unknown field here (other blocks"),
    ("data.eval={source: stdlib-docstrings, augment: {copies: 2}}", "eval: augment makes copies of training records"),
    ("losses=[{type: qkv_relation, relations: []}]", "losses[0].relations: List should have at least 1 item"),
    ("data.train={source: stdlib-docstrings, augment: {replace_prob: 0}}", "replace_prob: Input should be greater than 0"),
    # other tools' names for a field, and what a block takes where nothing is close
    ("train.learning_rate=1e-4", "train.learning_rate: unknown field; did you mean 'lr'?"),
    ("train.zzz=1", "train.zzz: unknown field; this block takes: steps, batch_size, grad_accum, lr,"),
    ("losses.0.temperature=2", "this block takes: type, weight, name, skip_cls, layers, projector,"),
    ("losses.0.tau=2", "losses[0].tau: unknown field; this block takes"),  # hidden_mse has no temperature
    ("losses=[{type: logit_kd, tau: 2}]", "losses[0].tau: unknown field; did you mean 'temperature'?"),
    # a union (one block or a list) that fails as a whole says so once; a block given as a scalar lists its fields
    ("data.train=3", "data.train: takes a mapping (one block) or a list of them (got 3)"),
    ("data.train=[{source: stdlib-docstrings, limt: 3}]", "data.train[0].limt: unknown field; did you mean 'limit'?"),
    ("teacher=packaged:x", "teacher: takes a mapping of fields (model, source, path,"),
    # a layer map in another shape, a misspelt name: the form a map takes, not each union branch's complaint
    ("losses.0.layers=[1, 2]", "losses[0].layers: a layer map is [[student, teacher], ...] pairs, e.g. [[1, 2]"),
    ("losses.0.layers=unifrom", "unknown layer map 'unifrom'; did you mean 'uniform'?"),
    ("student.from_teacher.layers=unifrom", "(got 'unifrom'); did you mean 'uniform'?"),
    ("train.schedule=cosin", "train.schedule: Input should be 'linear', 'cosine' or 'constant' (got 'cosin'); did "
                             "you mean 'cosine'?"),
    # taps: checked on reading, before any model loads
    ("losses=[{type: hidden_mse, student_tap: 'hidden_states[2]'}]", "give both student_tap and teacher_tap"),
    ("losses=[{type: hidden_mse, student_tap: hidden.2, teacher_tap: pooled}]", "unknown tap 'hidden.2' at student_tap"),
    ("losses=[{type: hidden_mse, student_tap: pooled, teacher_tap: hidden_states}]", "needs a layer index"),
    # a union's branch names are pydantic's, not the recipe's ("chunk_size.constrained-int: ...")
    ("losses=[{type: logit_kd, chunk_size: x}]", "losses[0].chunk_size: Input should be a valid integer"),
])
def test_errors_name_the_field(override, expected):
    with pytest.raises(ConfigError) as err:
        load_recipe(base(), [override])
    assert expected in str(err.value)


@pytest.mark.parametrize("override, only", [
    ("losses.0.layers=[]", "losses[0].layers: List should have at least 1 item"),
    ("losses.0.layers=[[1, 2, 3]]", "losses[0].layers[0]: Tuple should have at most 2 items"),
    ("student.from_teacher.layers=unifrom", "student.from_teacher.layers: Input should be 'uniform' or 'every_other'"),
])
def test_a_union_says_only_what_the_branch_the_value_was_meant_for_says(override, only):
    # a list is never one of the names, a name never a list: those branches' lines are noise
    with pytest.raises(ConfigError) as err:
        load_recipe(base(), [override])
    lines = str(err.value).splitlines()[1:]
    assert len(lines) == 1 and lines[0].strip().startswith(only)


def test_a_union_that_fails_inside_one_item_is_not_also_called_not_a_mapping():
    with pytest.raises(ConfigError) as err:
        load_recipe(base(), ["data.train=[{source: stdlib-docstrings, limt: 3}]"])
    assert "valid dictionary" not in str(err.value) and "takes a mapping" not in str(err.value)


def test_a_bad_field_inside_one_source_is_not_also_called_not_a_list():
    # data.train takes one source or a list: the list branch's complaint only hides the real one
    with pytest.raises(ConfigError) as err:
        load_recipe(base(), ["data.train={source: stdlib-docstrings, augment: {replace_prob: lots}}"])
    assert "augment.replace_prob: Input should be a valid number" in str(err.value)
    assert "valid list" not in str(err.value)


@pytest.mark.parametrize("override", ["quant.weights=true", "train.lr=true", "train.steps=false"])
def test_a_yes_no_is_not_read_as_a_number(override):
    # pydantic's lax mode reads `true` as 1: `quant: {weights: true}` would train a binary student
    field = override.split("=")[0]
    with pytest.raises(ConfigError, match=f"{field}: .* is a yes/no; this field takes a number"):
        load_recipe(base(), [override])


def test_yes_no_fields_still_take_yes_no():
    recipe = load_recipe(base(), ["data.group_by_length=true", "quant.attention=false"])
    assert recipe.stages[0].data.group_by_length is True and recipe.stages[0].quant.attention is False


def test_minillm_without_generated_batches_and_contradictory_sampling_are_refused():
    from kdistill.config import builtin_recipes

    minillm = str(builtin_recipes()["minillm"])
    with pytest.raises(ConfigError, match="minillm learns from the student's own samples, and this stage generates none"):
        load_recipe(minillm, ["on_policy.fraction=0"])
    with pytest.raises(ConfigError, match=r"teacher_mix .*; greedy: true \(SeqKD's writing\) cannot go with it"):
        load_recipe(minillm, ["on_policy.greedy=true"])
    with pytest.raises(ConfigError, match=r"generator: teacher and greedy: true \(SeqKD's writing\) cannot go"):
        load_recipe(str(builtin_recipes()["seqkd"]), ["on_policy.teacher_mix=0.3"])
    # samples that are not the student's at temperature 1: every importance weight 1 would call them its own
    for sets, said in ((["on_policy.teacher_mix=0", "on_policy.generator=teacher"], "generator: teacher"),
                       (["on_policy.teacher_mix=0", "on_policy.greedy=true"], "greedy: true"),
                       (["on_policy.temperature=0.7"], "temperature: 0.7")):
        with pytest.raises(ConfigError, match=rf"minillm's policy gradient needs the student's own samples at "
                                              rf"temperature 1 .*; on_policy has {said}: drop it"):
            load_recipe(minillm, sets)


def test_unknown_student_init_suggests():
    raw = base()
    raw["student"] = {"from_techer": {"layers": [1]}}
    with pytest.raises(ConfigError, match="did you mean 'from_teacher'"):
        load_recipe(raw)


def test_unknown_top_level_field_suggests():
    raw = base()
    raw["losess"] = raw.pop("losses")
    with pytest.raises(ConfigError, match="did you mean 'losses'"):
        load_recipe(raw)


def test_stages_merge_defaults_and_replace_lists():
    raw = base()
    raw["stages"] = [
        {"name": "general", "train": {"steps": 5}},
        {"name": "task", "losses": [{"type": "embedding_cosine"}], "train": {"lr": 1e-3}},
    ]
    r = load_recipe(raw)
    general, task = r.stages
    assert general.train.steps == 5 and general.losses[0].type == "hidden_mse"
    assert task.train.steps == 10 and task.train.lr == 1e-3 and task.losses[0].type == "embedding_cosine"
    assert general.student.from_teacher.layers == [1, 3, 5]
    assert task.student is None  # continues from the previous stage's student


def test_stage_errors_carry_the_stage_path():
    raw = base()
    raw["stages"] = [{"name": "a"}, {"name": "b", "train": {"lr": -1}}]
    with pytest.raises(ConfigError, match=r"stages\[1\]\.train\.lr"):
        load_recipe(raw)


def test_missing_recipe_file_suggests_builtin():
    with pytest.raises(ConfigError, match="minilm-l3"):
        load_recipe("minilm-l4")


def test_invalid_yaml(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("teacher: [unclosed")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_recipe(str(path))
    path.write_text("losses:\n  - {type: hidden_mse, student_tap: hidden_states[2], teacher_tap: pooled}\n")
    with pytest.raises(ConfigError, match=r"inside \{ \} a value with \[ \] or a comma needs quotes"):
        load_recipe(str(path))
    # YAML lets the last of two equal keys win: a second train: block would silently replace the first
    path.write_text("name: x\ntrain: {steps: 2}\nlosses: [{type: logit_kd, type: cross_entropy}]\ntrain: {steps: 9}\n")
    with pytest.raises(ConfigError, match=r"the key 'train' is given twice(.|\n)*line 4"):
        load_recipe(str(path))
    path.write_text("name: x\ntrain: {steps: 2}\nlosses: [{type: logit_kd, type: cross_entropy}]\n")
    with pytest.raises(ConfigError, match=r"the key 'type' is given twice(.|\n)*line 3"):
        load_recipe(str(path))
    # a YAML merge key is no duplicate: the keys after it override what it brings
    path.write_text(yaml.safe_dump(base()).replace("train:\n  steps: 10", "train: {<<: &t {steps: 3, lr: 1.0e-4}, "
                                                                         "lr: 2.0e-4}"))
    assert load_recipe(str(path)).stages[0].train.model_dump(include={"steps", "lr"}) == {"steps": 3, "lr": 2e-4}


def test_a_recipe_that_is_a_folder_or_not_text_is_named(tmp_path):
    with pytest.raises(ConfigError, match="is not a file"):
        load_recipe(str(tmp_path))
    binary = tmp_path / "model.bin"
    binary.write_bytes(bytes(range(128, 256)))
    with pytest.raises(ConfigError, match="cannot be read as text"):
        load_recipe(str(binary))


def test_set_into_a_scalar_is_refused_not_replaced():
    with pytest.raises(ConfigError, match=r"--set train.steps.foo: train.steps is 10, not a mapping"):
        load_recipe(base(), ["train.steps.foo=3"])
    uniform = load_recipe(base(), ["student.from_teacher.layers=uniform", "student.from_teacher.num_layers=3"])
    assert uniform.stages[0].student.from_teacher.num_layers == 3


def test_set_with_a_value_that_is_not_yaml():
    with pytest.raises(ConfigError, match=r"--set train.steps: the value '\[1' is not valid YAML"):
        load_recipe(base(), ["train.steps=[1"])


@pytest.mark.parametrize("name", sorted(builtin_recipes()))
def test_builtin_recipes_validate(name):
    r = load_recipe(name)
    assert r.stages and all(s.losses or s.synthesize for s in r.stages)


def test_dump_roundtrip_and_diff(tmp_path):
    r = load_recipe(base())
    path = tmp_path / "resolved.yaml"
    path.write_text(yaml.safe_dump(r.dump()))
    again = load_recipe(str(path))
    assert again.dump() == r.dump()
    changed = load_recipe(base(), ["train.lr=0.5"])
    assert diff_configs(r.dump(), changed.dump()) == ["stages[0].train.lr: 0.0001 -> 0.5"]


def test_a_field_added_since_a_run_started_is_not_a_change():
    # A run saved by an older kdistill lacks fields added since; read with today's defaults they agree.
    r = load_recipe("binarybert")
    saved = r.dump()
    for stage in saved["stages"]:
        stage["teacher"].pop("source")
        stage["teacher"].pop("top_k")
        for loss in stage["losses"]:
            loss.pop("beta", None)
    assert diff_configs(saved, r.dump())  # the raw dumps differ...
    assert recipe_changes(saved, r) == []  # ...the recipes do not
    saved["stages"][0]["train"]["lr"] = 0.5
    assert recipe_changes(saved, r) == [f"stages[0].train.lr: 0.5 -> {r.stages[0].train.lr}"]
    saved["stages"][0]["train"]["retired_field"] = 1  # unreadable today: the raw difference names it
    assert "stages[0].train.retired_field: 1 -> None" in recipe_changes(saved, r)


def test_the_same_run_folder_spelt_another_way_is_not_a_change(tmp_path, monkeypatch):
    # compare reuses finished runs and trains edited ones again (deleting the old): a relative path saved
    # by one call and the absolute one of the next name the same folder, so the run must count as unedited
    monkeypatch.chdir(tmp_path)
    saved = load_recipe("supersense-kd", output="runs/compare/full/supersense-kd/seed-0").dump()
    again = load_recipe("supersense-kd", output=str(tmp_path / "runs/compare/full/supersense-kd/seed-0"))
    assert recipe_changes(saved, again) == []


def test_bookkeeping_and_the_name_are_not_a_change():
    # how often a run evaluates, logs and saves (tests/engine/test_run.py: no weight changes) and what it is
    # called: resuming with others, or compare meeting a finished run that differs only there, retrains nothing
    r = load_recipe("tinybert")
    saved = r.dump()
    saved["name"] = "tinybert-baseline"
    for field in ("save_every", "eval_every", "log_every", "keep_checkpoints"):
        saved["stages"][0]["train"][field] = 7
    assert diff_configs(saved, r.dump())
    assert recipe_changes(saved, r) == []
    saved["stages"][0]["train"]["seed"] = 7  # the fields that shape training still count
    assert recipe_changes(saved, r) == ["stages[0].train.seed: 7 -> 0"]


def test_the_python_api_applies_output_to_a_loaded_recipe_and_refuses_what_it_cannot_apply(tmp_path):
    import kdistill

    recipe = kdistill.load_recipe(base())
    assert kdistill.load_recipe(recipe, output=str(tmp_path / "elsewhere")).output == str(tmp_path / "elsewhere")
    with pytest.raises(ConfigError, match="not to a loaded Recipe"):
        kdistill.load_recipe(recipe, ["train.steps=7"])
    with pytest.raises(ConfigError, match="list of 'KEY=VALUE' strings"):
        kdistill.load_recipe(base(), "train.steps=7")
    assert kdistill.load_recipe(base(), ["train.steps=7"]).stages[0].train.steps == 7


def test_the_python_api_refuses_arguments_of_the_wrong_kind_before_anything_runs(tmp_path, monkeypatch):
    import kdistill

    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError, match=r"output is a folder path \(str or Path\), got int 5"):
        kdistill.distill(base(), overrides=None, output=5)  # wrote to ./5 before
    with pytest.raises(ConfigError, match=r"resume is True or False, got 'no'"):  # a truthy string resumed
        kdistill.distill(base(), overrides=None, resume="no")
    assert list(tmp_path.iterdir()) == []
    monkeypatch.setenv("KDISTILL_HOME", str(tmp_path / "home"))  # recipe:NAME is its trained student, not a hub id
    with pytest.raises(ConfigError, match=r"ref recipe:teacher-supersense: that recipe has not been trained here yet"):
        kdistill.load_model("recipe:teacher-supersense")
    with pytest.raises(ConfigError, match=r"teacher recipe:teacher-supersense: that recipe has not been trained"):
        kdistill.evaluate(str(tmp_path), "recipe:teacher-supersense", {"source": "wordnet-supersense"})


@pytest.mark.parametrize("output", [None, "", "  "])
def test_an_empty_output_is_refused_not_a_folder_named_none(output):
    with pytest.raises(ConfigError, match="output is empty; give the run's folder"):
        load_recipe({**base(), "output": output})


@pytest.mark.parametrize("name", ["../escaped", "a/b", "..", "", "/abs", "a\\b", " "])
def test_a_recipe_name_is_a_folder_name_not_a_path(name):
    recipe = {k: v for k, v in base().items() if k != "output"}  # so the default runs/NAME would escape runs/
    with pytest.raises(ConfigError, match=r"name .*: a recipe's name is a folder name .*cannot be empty"):
        load_recipe({**recipe, "name": name})
    assert load_recipe({**recipe, "name": "my-kd_2.b"}).output == "runs/my-kd_2.b"
    assert load_recipe({**recipe, "name": "DistilBERT (3 layers)"}).name == "DistilBERT (3 layers)"


@pytest.mark.parametrize("name", ["../../escaped", "a/b", "..", "", "has space"])
def test_a_stage_name_is_a_folder_name_inside_the_run(name):
    with pytest.raises(ConfigError, match=r"stages\[1\]\.name .*letters, digits"):
        load_recipe({**base(), "stages": [{"name": "first"}, {"name": name}]})
    assert load_recipe({**base(), "stages": [{"name": "general"}, {"name": "task-2.b_c"}]}).stages[1].name == "task-2.b_c"


def test_set_names_an_index_out_of_range_and_a_list_the_recipe_lacks():
    with pytest.raises(ConfigError, match=r"losses has 1 item\(s\), so index 5 is out of range \(0 to 0\)"):
        load_recipe(base(), ["losses.5.weight=1"])
    with pytest.raises(ConfigError, match=r"no stages list to index; a one-stage recipe has none: set train.steps"):
        load_recipe(base(), ["stages.3.train.steps=1"])


def test_a_negative_loss_weight_is_refused():
    recipe = base()
    recipe["losses"] = [{"type": "logit_kd", "weight": -1}]
    with pytest.raises(ConfigError, match=r"losses\[0\]\.weight: Input should be greater than or equal to 0"):
        load_recipe(recipe)


def test_all_zero_loss_weights_are_refused_one_zero_is_not():
    recipe = base()
    recipe["losses"] = [{"type": "logit_kd", "weight": 0}, {"type": "hidden_mse", "weight": 0.0}]
    with pytest.raises(ConfigError, match=r"losses: every weight is 0, so the student would learn nothing"):
        load_recipe(recipe)
    recipe["losses"][1]["weight"] = 0.5
    assert [t.weight for t in load_recipe(recipe).stages[0].losses] == [0, 0.5]


def test_a_recipe_wide_set_that_every_stage_overrides_is_refused_not_ignored():
    two = {**base(), "stages": [{"name": "a", "train": {"steps": 3}}, {"name": "b", "train": {"steps": 4}}]}
    with pytest.raises(ConfigError, match=r"--set train.steps: every stage sets its own train.steps, .* "
                                          r"stages.0.train.steps="):
        load_recipe(two, ["train.steps=10"])
    # a stage that inherits it takes it; the one with its own keeps its own
    two["stages"][1]["train"] = {"lr": 1e-4}
    with pytest.warns(UserWarning, match=r"--set train.steps: not applied to stage a, which sets its own "
                                         r"train.steps; add --set stages.0.train.steps=10 to change it too"):
        recipe = load_recipe(two, ["train.steps=10"])  # said, not silent: the user may have meant every stage
    assert [s.train.steps for s in recipe.stages] == [3, 10]
    import warnings

    with warnings.catch_warnings():  # done as the warning says, in either order: nothing left to say
        warnings.simplefilter("error")
        for order in (["train.steps=10", "stages.0.train.steps=10"], ["stages.0.train.steps=10", "train.steps=10"]):
            assert [s.train.steps for s in load_recipe(two, order).stages] == [10, 10]
    assert load_recipe(two, ["stages[0].train.steps=7"]).stages[0].train.steps == 7
    # a synthesize stage takes no training defaults, and a stage's own list replaces the recipe-wide one whole
    with pytest.raises(ConfigError, match=r"--set train.steps: every stage sets its own train.steps \(or is a "
                                          r"synthesize stage.*e.g. stages.1.train.steps="):  # pad's training stage
        load_recipe("pad", ["train.steps=5"])
    with pytest.raises(ConfigError, match=r"--set losses.0.weight: every stage sets its own losses, so"):
        load_recipe("mobilebert", ["losses.0.weight=7"])


def test_a_stages_own_student_or_data_source_replaces_the_shared_one_whole(tmp_path):
    """Merged key by key, `student: {model: X}` under a shared from_teacher was refused as two kinds at once."""
    data = tmp_path / "d.jsonl"
    data.write_text('{"text": "a"}\n')
    two = {**base(), "stages": [{"name": "a"}, {"name": "b", "student": {"model": "packaged:all-MiniLM-L6-v2"},
                                                "data": {"train": {"path": str(data)}}}]}
    recipe = load_recipe(two)
    assert recipe.stages[0].student.from_teacher is not None and recipe.stages[0].data.train.source is not None
    b = recipe.stages[1]
    assert b.student.from_teacher is None and b.student.model == "packaged:all-MiniLM-L6-v2"
    assert b.data.train.source is None and b.data.train.path == str(data)
    # of the same kind, they merge as any mapping does: the shared from_teacher's model stays
    shared = {**base(), "student": {"from_teacher": {"layers": [1, 3, 5], "model": "packaged:all-MiniLM-L6-v2"}},
              "stages": [{"name": "a"}, {"name": "b", "student": {"from_teacher": {"layers": [2, 4]}}}]}
    b = load_recipe(shared).stages[1].student.from_teacher
    assert b.layers == [2, 4] and b.model == "packaged:all-MiniLM-L6-v2"
    # a stage block naming no kind adjusts the shared source (a limit, an augment), of whatever kind it is
    adjust = {**base(), "data": {"train": {"source": "stdlib-docstrings"},
                                 "eval": {"source": "stdlib-docstrings", "split": "eval", "limit": 50}},
              "stages": [{"name": "a"}, {"name": "b", "data": {"eval": {"limit": 10}}}]}
    evals = load_recipe(adjust).stages[1].data.eval
    assert evals.source == "stdlib-docstrings" and evals.limit == 10


def test_a_tilde_means_home_in_every_path_a_recipe_or_command_names(tmp_path, monkeypatch):
    """`~` was expanded for models only: an output ~/x made a folder named ~ in the working directory."""
    from kdistill.teachers.recipe_runs import kdistill_home

    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "d.jsonl").write_text('{"text": "a"}\n')
    recipe = {**base(), "output": "~/run", "data": {"train": {"path": "~/d.jsonl"}}}
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    loaded = load_recipe("~/r.yaml")
    assert loaded.output == str(tmp_path / "run") and loaded.stages[0].data.train.path == str(tmp_path / "d.jsonl")
    monkeypatch.setenv("KDISTILL_HOME", "~/kh")
    assert kdistill_home() == tmp_path / "kh"
    monkeypatch.setenv("KDISTILL_HOME", "")  # empty: the default, not the working directory
    assert kdistill_home() == tmp_path / ".cache" / "kdistill"


def test_a_file_spelt_relative_or_absolute_is_not_a_changed_recipe(tmp_path, monkeypatch):
    """Resuming with data.train.path=train.jsonl where the run had the absolute path was refused as an edit."""
    from kdistill.recipe_diff import recipe_changes

    (tmp_path / "train.jsonl").write_text('{"text": "a"}\n')
    monkeypatch.chdir(tmp_path)
    absolute = {**base(), "data": {"train": {"path": str(tmp_path / "train.jsonl")}}}
    relative = {**base(), "data": {"train": {"path": "train.jsonl"}}}
    assert recipe_changes(load_recipe(absolute).dump(), load_recipe(relative)) == []
    (tmp_path / "other.jsonl").write_text('{"text": "b"}\n')
    other = {**base(), "data": {"train": {"path": "other.jsonl"}}}
    assert recipe_changes(load_recipe(absolute).dump(), load_recipe(other)) != []


def test_a_bad_value_from_set_is_not_blamed_on_the_file_alone():
    with pytest.raises(ConfigError, match=r"^recipe with --set train.batch_size=0: invalid recipe"):
        load_recipe(base(), ["train.batch_size=0"])


def test_a_recipe_file_without_a_name_is_named_by_the_file_and_runs_in_runs_name(tmp_path):
    raw = {k: v for k, v in base().items() if k not in ("name", "output")}
    path = tmp_path / "my-kd.yaml"
    path.write_text(yaml.safe_dump(raw))
    for overrides in ([], ["train.steps=3"]):  # --set used to leak into the name ('my-kd.yaml with --set train')
        recipe = load_recipe(str(path), overrides)
        assert (recipe.name, recipe.output) == ("my-kd", "runs/my-kd")  # not one runs/run for every nameless file


def test_the_python_api_words_its_refusals_for_python():
    """load_recipe passed the command line's words through (`with --set ...`, `--set 'x'`), and distill's token swap
    made `(as overrides= takes)` and `choose another output=`."""
    import kdistill
    from kdistill import in_api_words

    with pytest.raises(ConfigError, match=r"with overrides \[train.stepz=2\]: invalid recipe") as err:
        kdistill.load_recipe("minilm-l3", overrides=["train.stepz=2"])
    with pytest.raises(ConfigError, match=r"^override 'train.steps': expected KEY=VALUE"):
        kdistill.load_recipe("minilm-l3", overrides=["train.steps"])
    with pytest.raises(ConfigError, match="output is a folder path"):
        kdistill.load_recipe("minilm-l3", output=5)  # was taken as the folder '5'
    with pytest.raises(ConfigError, match=r"^overrides are 'KEY=VALUE' strings, got \[3\]$"):
        kdistill.distill("minilm-l3", overrides=[3])  # was "(as overrides= takes)"
    assert "--set" not in str(err.value)
    said = in_api_words("runs/x holds a run: pass --resume to continue it, or choose another --output; "
                        "`kdistill run lm-teacher` trains it, `kdistill run lm-teacher --output /c/lm` where it looks")
    assert said == ("runs/x holds a run: pass resume=True to continue it, or pass another output=; "
                    "kdistill.distill('lm-teacher') trains it, kdistill.distill('lm-teacher', output='/c/lm') where "
                    "it looks")


def test_the_public_load_model_refuses_a_task_whose_head_the_model_lacks():
    # an embedding model as causal-lm came back with a random LM head and only transformers' warnings
    import kdistill

    with pytest.raises(ConfigError, match=r"packaged:all-MiniLM-L6-v2 was saved as an embedding model, so as causal-lm "
                                          r"its head would be random weights"):
        kdistill.load_model("packaged:all-MiniLM-L6-v2", task="causal-lm")
    assert kdistill.load_model("packaged:all-MiniLM-L6-v2", task="embedding").task == "embedding"


def test_a_key_pasted_through_set_is_not_repeated():
    override = ('stages.0.synthesize.teacher={api: {base_url: "http://x/v1", model: m, '
                'api_key_env: "sk-SECRETVALUE999"}}')
    with pytest.raises(ConfigError, match=r"(?s)with --set stages\.0\.synthesize\.teacher=…: invalid recipe.*"
                                          r"api_key_env: .*never the key itself") as said:
        load_recipe("pad", [override])
    assert "SECRETVALUE" not in str(said.value)
    with pytest.raises(ConfigError, match=r"with --set train\.stpes=5"):  # other values are shown as given
        load_recipe("pad", ["train.stpes=5"])


def test_a_service_url_with_credentials_is_refused_without_repeating_them():
    for url in ("https://user:tok-XYZ987@api.example.com/v1", "https://api.example.com/v1?k=tok-XYZ987"):
        with pytest.raises(ConfigError, match=r"base_url: .*holds credentials or a query string") as said:
            load_recipe("pad", [f'stages.0.synthesize.teacher={{api: {{base_url: "{url}", model: m}}}}'])
        assert "XYZ987" not in str(said.value)
    load_recipe("pad", ['stages.0.synthesize.teacher={api: {base_url: "http://127.0.0.1:8000/v1", model: m}}'])
