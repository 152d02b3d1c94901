from kdistill.engine.build import spread


def test_eval_limit_takes_records_evenly_through_an_ordered_corpus():
    records = [{"pos": "noun"}] * 70 + [{"pos": "verb"}] * 20 + [{"pos": "adj"}] * 10
    picked = spread(records, 10)
    assert [r["pos"] for r in picked] == ["noun"] * 7 + ["verb"] * 2 + ["adj"]
    assert spread(records, 500) == records and spread(records, None) == records
