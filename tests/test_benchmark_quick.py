"""The side-by-side benchmark runs end to end in --quick mode and writes its tables (to a temporary file)."""

from __future__ import annotations

import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from benchmarks import run  # noqa: E402


def test_quick_benchmark_writes_tables(tmp_path, monkeypatch):
    # A method that is not importable is reported, not fatal.
    monkeypatch.setitem(run.METHODS, "Missing", ("NoSuchMethod", {}))
    out = tmp_path / "BENCHMARKS.md"
    results = run.main(["--quick", "--workdir", str(tmp_path / "work"), "--out", str(out)])

    text = out.read_text()
    assert "<!-- BEGIN evaluation-quick -->" in text and "<!-- END evaluation-quick -->" in text
    for heading in ("### LDS: Concrete", "### LDS: Digits", "### Subset removal", "### Mislabel", "### Leakage"):
        assert heading in text
    # Every method has a row in every table: with a number, or saying why not.
    for name in [*run.METHODS, "random"]:
        assert text.count(f"| {name} |") >= 4, name
    assert "| random removal |" in text
    assert text.count("| Missing | not available") >= 4

    digits = results["lds"]["digits"]["methods"]
    assert -1.0 <= digits["random"]["lds"] <= 1.0
    ran = [m for m in digits.values() if m["status"] == "ok"]
    assert all(-1.0 <= m["lds"] <= 1.0 and m["ci"][0] <= m["lds"] <= m["ci"][1] for m in ran)
    # Signs: the methods that track the non-converged digits run predict re-training (measured LDS 0.82, 0.67,
    # 0.83; a flipped sign gives about -0.8), and self-influence finds the flipped labels (AUC 0.96-0.97
    # measured; flipped: about 0.04; random 0.55)
    for name in ("SOURCE", "TracInCP", "Forward-INF"):
        assert digits[name]["lds"] > 0.3, (name, digits[name])
    mislabel = results["mislabel"]["methods"]
    assert 0.0 <= mislabel["random"]["auc"] <= 1.0
    for name in ("SOURCE", "EK-FAC IF", "TracInCP", "Forward-INF"):
        assert mislabel[name]["auc"] > 0.85, (name, mislabel[name])
    assert json.loads((tmp_path / "work" / "results.json").read_text().replace("NaN", "null"))["lds"]
    assert sorted(p.name for p in (tmp_path / "work" / "plots").glob("*.png")) == [
        "counterfactual.png",
        "lds-concrete.png",
        "lds-digits.png",
        "leakage.png",
        "mislabel.png",
    ]

    # A second run reuses the cached ground truth: no model is re-trained for the LDS.
    again = run.main(["--quick", "--experiments", "digits", "--workdir", str(tmp_path / "work"), "--out", str(out)])
    assert again["lds"]["digits"]["ground_truth"]["trained"] == 0
