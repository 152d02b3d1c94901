"""The `kdistill` commands of the API-based family: PaD and Lion comparisons, a teacher store from a service's
logprobs, and a local model served over the OpenAI-compatible protocol. Registered on kdistill.cli's app."""
from __future__ import annotations

from typing import List, Optional

import typer

from kdistill.cli import SetOpt, app, console, friendly


@app.command("compare-pad")
@friendly
def compare_pad_cmd(seeds: int = typer.Option(3, min=1, help="seeds per variant"),
                    output: str = typer.Option("runs/pad-compare", help="where runs and the table go"),
                    test_limit: Optional[int] = typer.Option(None, min=1, help="test problems scored (default: all)"),
                    set_: Optional[List[str]] = SetOpt):
    """PaD: students on execution-filtered vs unfiltered teacher programs vs direct answers, scored by
    execution accuracy on held-out problems. `--set K=V` changes every variant's recipe, `--set VARIANT:K=V` one
    (pad and pad-unfiltered train in stages.1, pad-direct in its only stage)."""
    from kdistill.api.pad import compare_pad

    compare_pad(seeds=seeds, output=output, test_limit=test_limit, console=console, overrides=set_ or [])


@app.command("compare-lion")
@friendly
def compare_lion_cmd(seeds: int = typer.Option(1, min=1, help="seeds per variant"),
                     output: str = typer.Option("runs/lion-compare", help="where runs and the table go"),
                     set_: Optional[List[str]] = SetOpt):
    """Lion (imitation, discrimination, generation rounds) against plain imitation for the same number of
    teacher answers, scored by ROUGE-L of the student's definitions after every round. `--set K=V` changes both
    variants' recipes, `--set VARIANT:K=V` one (lion or lion-random)."""
    from kdistill.api.lion_compare import compare_lion

    compare_lion(seeds, output, set_ or [], console=console)


@app.command("cache-api-teacher")
@friendly
def cache_api_teacher_cmd(recipe: str = typer.Argument(..., help="recipe whose training texts to score"),
                          base_url: str = typer.Option(..., help="the OpenAI-compatible service, e.g. http://127.0.0.1:8000/v1"),
                          model: str = typer.Option(..., help="the model id the service serves"),
                          api_key_env: Optional[str] = typer.Option(None, help="environment variable holding the API key"),
                          vocabulary: Optional[str] = typer.Option(None, help="tokenizer directory (default: the recipe teacher's)"),
                          k: int = typer.Option(20, help="top-k log-probabilities per position (services cap it: "
                                                "serve-teacher and vLLM at 20, OpenAI at 5)"),
                          stage: int = typer.Option(0, help="which stage's training data"),
                          out: Optional[str] = typer.Option(None, help="store directory (default: the stage's teacher.path, "
                                                          "else OUTPUT/teacher-store); the service's answers are "
                                                          "cached beside it in OUT.teacher.sqlite"),
                          dtype: str = typer.Option("float16", help="float16 or float32"),
                          max_tokens: int = typer.Option(0, help="also score this many generated tokens"),
                          set_: Optional[List[str]] = SetOpt):
    """Score the training texts with an API teacher's logprobs and write them as a teacher store, so
    `teacher: {source: cache, path: STORE}` distils logits from a service."""
    from kdistill.api.api_store import cache_api_teacher
    from kdistill.config import load_recipe

    path = cache_api_teacher(load_recipe(recipe, set_ or []),
                             {"base_url": base_url, "model": model, "api_key_env": api_key_env}, vocabulary,
                             stage_index=stage, k=k, out=out, dtype=dtype, max_tokens=max_tokens, console=console)
    console.print(f"wrote {path}")


@app.command("serve-teacher")
@friendly
def serve_teacher(model_dir: str = typer.Argument(..., help="a Hugging Face causal LM directory, or recipe:NAME "
                                                  "(a built-in recipe's model, trained first if it is not yet)"),
                  port: int = typer.Option(8000, min=0, max=65535, help="TCP port"),
                  host: str = typer.Option("127.0.0.1", help="address to bind; other than loopback needs --allow-remote"),
                  allow_remote: bool = typer.Option(False, help="allow binding a non-loopback address"),
                  model_name: Optional[str] = typer.Option(None, help="the model id clients ask for (default: the folder name)"),
                  trust_remote_code: bool = typer.Option(False, help="run the model directory's own Python code (a "
                                                         "custom architecture); off unless you trust its source")):
    """Serve a local causal LM over the OpenAI-compatible protocol (completions and chat, with logprobs),
    so API-based distillation runs offline against a teacher made here."""
    from kdistill.api.server import serve
    from kdistill.teachers.recipe_runs import resolve_teacher

    serve(resolve_teacher(model_dir, console), host=host, port=port, allow_remote=allow_remote,
          model_name=model_name, trust_remote_code=trust_remote_code, console=console)
