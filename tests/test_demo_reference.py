"""The demo's check against its documented spread: the reference from seeded runs, a run inside and outside it,
and the rows that only one side has."""
import json

from utils.demo_reference import comparison_path, format_check, run_values, spread


def _write_comparison(root, model, rows):
    path = comparison_path(root, "digits-012345", model)
    path.parent.mkdir(parents=True)
    entries = [{"name": name, "kind": kind, "results": {"heldout": {"AUROC": heldout, "FPR95": 50.0},
                                                        "blobs": {"AUROC": 99.0}, "average": {"AUROC": average}}}
               for name, kind, heldout, average in rows]
    path.write_text(json.dumps({"rows": entries}))


def test_run_values_read_every_model_and_key_combined_rows(tmp_path):
    _write_comparison(tmp_path, "energy", [("min", "detector", 94.041, 89.68), ("min", "combined", 88.1, 95.6),
                                           ("KNN", "baseline", 96.6, 98.1)])
    _write_comparison(tmp_path, "bce", [("original", "detector", 92.5, 71.9)])
    assert run_values(tmp_path, "digits-012345") == {
        "energy: min": {"heldout": 94.04, "average": 89.68}, "energy: min combined": {"heldout": 88.1, "average": 95.6},
        "energy: KNN": {"heldout": 96.6, "average": 98.1}, "bce: original": {"heldout": 92.5, "average": 71.9}}


def test_spread_and_check():
    runs = {1: {"a": {"heldout": 90.0, "average": 80.0}, "b": {"heldout": 50.0, "average": 60.0}},
            2: {"a": {"heldout": 94.0, "average": 70.0}},
            3: {"a": {"heldout": 92.0, "average": 85.0}, "b": {"heldout": 55.0, "average": 61.0}}}
    reference = spread(runs, documented_seed=1)
    assert reference["seeds"] == [1, 2, 3] and list(reference["rows"]) == ["a"]  # b is missing from run 2
    assert reference["rows"]["a"] == {"heldout": {"documented": 90.0, "min": 90.0, "max": 94.0},
                                      "average": {"documented": 80.0, "min": 70.0, "max": 85.0}}
    inside = format_check({"a": {"heldout": 91.0, "average": 70.0}}, reference)
    assert "outside" not in inside and "2 of 2 values within the range of 3 seeds." in inside
    check = format_check({"a": {"heldout": 95.5, "average": 75.0}, "new": {"heldout": 1.0, "average": 2.0}},
                         reference)
    line = next(line for line in check.splitlines() if line.startswith("a "))
    assert line.count("outside") == 1 and "95.50 |  90.00 |  90.00- 94.00  outside" in line
    assert "1 of 2 values within" in check and "show '-'" in check
    assert "Documented rows this run lacks: a." in format_check({}, reference)
