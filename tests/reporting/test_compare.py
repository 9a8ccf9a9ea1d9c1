"""`maxmatch compare`: rows over seeds (mean ± sample std), ΔRSUM, labels, Table 3 marks, files, bad input.

Every input is written by hand with known numbers: evaluation JSONs as `evaluate --json` writes them, run folders
(recipe.toml, metrics.jsonl, optionally a checkpoint header) as `train` writes them, and a demo_results.json.
"""

import io
import json
import statistics

import numpy as np
import pandas as pd
import pytest
from rich.console import Console
from typer.testing import CliRunner

from maxmatch_cli.reporting import compare as cmp
from maxmatch_cli.cli.app import app
from maxmatch_cli.evaluation.eccv import CXC_KEYS, ECCV_KEYS
from maxmatch_cli.errors import MaxMatchError
from maxmatch_cli.config.recipes import load_recipe, to_toml

CHAMFER = {"loss.similarity": "chamfer", "loss.gd_weight": "0", "loss.isd_weight": "0"}
MIL_NO_DIV = {"loss.similarity": "mil", "loss.div_weight": "0", "loss.gd_weight": "0", "loss.isd_weight": "0"}


def metrics(i2t: float, t2i: float) -> dict:
    """Recalls i2t, i2t+10, i2t+20, t2i, t2i+10, t2i+20 and their sum, as `evaluate` reports them."""
    m = {"i2t_r1": i2t, "i2t_r5": i2t + 10, "i2t_r10": i2t + 20, "t2i_r1": t2i, "t2i_r5": t2i + 10,
         "t2i_r10": t2i + 20, "i2t_medr": 2.0, "t2i_medr": 3.0}
    m["rsum"] = sum(m[k] for k in cmp.METRICS[:6])
    return m


def eval_json(path, m, split="test", protocol="full", similarity="maxmatch", checkpoint="best.safetensors"):
    record = {"protocol": protocol, "metrics": m, "folds": [], "checkpoint": checkpoint, "split": split,
              "data": "demo/features.h5", "similarity": similarity, "n_images": 1000, "n_captions": 5000,
              "provenance": {"maxmatch_version": "0"}}
    path.write_text(json.dumps(record, indent=2) + "\n")
    return path


def make_run(folder, seed, m=None, overrides=None, val=(), header=False):
    """A run folder of the demo recipe (with overrides); ``m``: its test.json; ``val``: validation records."""
    recipe = load_recipe("demo", {**(overrides or {}), "train.seed": str(seed)})
    folder.mkdir(parents=True)
    (folder / "recipe.toml").write_text(to_toml(recipe))
    lines = [json.dumps({"epoch": i + 1, "step": 10 * (i + 1), **{f"val/{k}": v for k, v in r.items()}})
             for i, r in enumerate(val)]
    (folder / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    if header:  # a checkpoint whose header names the recipe (tensors are not read)
        from safetensors.numpy import save_file

        meta = {"recipe": json.dumps(recipe.to_dict() | {"name": "demo", "description": recipe.description})}
        save_file({"x": np.zeros(1, dtype=np.float32)}, str(folder / "best.safetensors"), metadata=meta)
    if m is not None:
        eval_json(folder / "test.json", m, similarity=recipe.loss.similarity)
    return folder


@pytest.fixture
def runs(tmp_path):
    """demo with seeds 0-2 (i2t R@1 40/42/44) and demo + chamfer overrides with seeds 0-1 (i2t R@1 30/31)."""
    demo = [make_run(tmp_path / f"demo-s{s}", s, metrics(40 + 2 * s, 20 + s)) for s in range(3)]
    chamfer = [make_run(tmp_path / f"chamfer-s{s}", s, metrics(30 + s, 15), CHAMFER) for s in range(2)]
    return demo, chamfer


def test_seeds_form_one_row_with_mean_and_sample_std(runs):
    demo, chamfer = runs
    comp = cmp.compare_runs([*demo, *chamfer])
    f = comp.frame
    assert list(f["label"]) == ["demo", "demo loss.similarity=chamfer loss.gd_weight=0 loss.isd_weight=0"]
    assert list(f["n"]) == [3, 2] and list(f["seeds"]) == ["0 1 2", "0 1"]
    rsums = [metrics(40 + 2 * s, 20 + s)["rsum"] for s in range(3)]
    assert f.loc[0, "i2t_r1_mean"] == pytest.approx(42) and f.loc[0, "i2t_r1_std"] == pytest.approx(2)  # n - 1
    assert f.loc[0, "rsum_mean"] == pytest.approx(statistics.fmean(rsums))
    assert f.loc[0, "rsum_std"] == pytest.approx(statistics.stdev(rsums))
    assert f.loc[1, "t2i_r1_std"] == 0 and f.loc[1, "i2t_r1_mean"] == pytest.approx(30.5)
    # ΔRSUM against the first row by default.
    chamfer_rsum = statistics.fmean(metrics(30 + s, 15)["rsum"] for s in range(2))
    assert comp.baseline == "demo" and f.loc[0, "delta_rsum"] == 0
    assert f.loc[1, "delta_rsum"] == pytest.approx(chamfer_rsum - statistics.fmean(rsums))
    assert set(f["source"]) == {"test/full"} and not comp.notes


def test_baseline_by_label_or_unique_part(runs):
    demo, chamfer = runs
    comp = cmp.compare_runs([*demo, *chamfer], baseline="similarity=chamfer")
    assert "similarity=chamfer" in comp.baseline and comp.frame.loc[1, "delta_rsum"] == 0
    assert comp.frame.loc[0, "delta_rsum"] > 0
    assert cmp.compare_runs([*demo, *chamfer], baseline="demo").baseline == "demo"  # exact label first
    with pytest.raises(MaxMatchError, match="matches no row") as info:
        cmp.compare_runs([*demo, *chamfer], baseline="sinkhorn")
    assert "'demo'" in info.value.hint


def test_group_by_run_and_recipe(runs):
    demo, chamfer = runs
    per_run = cmp.compare_runs([*demo, *chamfer], group_by="run").frame
    assert len(per_run) == 5 and list(per_run["n"]) == [1] * 5
    assert per_run.loc[1, "label"] == "demo seed 1" and np.isnan(per_run.loc[1, "rsum_std"])
    by_name = cmp.compare_runs([*demo, *chamfer], group_by="recipe").frame
    assert list(by_name["label"]) == ["demo"] and by_name.loc[0, "n"] == 5
    with pytest.raises(MaxMatchError, match="unknown --group-by 'seed'"):
        cmp.compare_runs(demo, group_by="seed")


def test_labels_name_only_what_differs_from_the_shipped_recipe(tmp_path):
    a = make_run(tmp_path / "a", 0, metrics(40, 20), {"optim.lr": "0.0005"})
    b = make_run(tmp_path / "b", 0, metrics(41, 20))
    c = make_run(tmp_path / "c", 0, metrics(42, 20), {"optim.lr": "0.0005", "data.num_workers": "0"})
    f = cmp.compare_runs([a, b, c]).frame  # num_workers does not make another configuration
    assert list(f["label"]) == ["demo optim.lr=0.0005", "demo"] and list(f["n"]) == [2, 1]


def test_run_folder_without_evaluation_uses_last_validation(tmp_path):
    run = make_run(tmp_path / "r", 0, val=[metrics(10, 5), metrics(20, 10)])
    with (run / "metrics.jsonl").open("a") as fh:
        fh.write('{"epoch": 3, "val/rsum": 1')  # a record being written right now
    comp = cmp.compare_runs([run])
    row = comp.frame.loc[0]
    assert row["i2t_r1_mean"] == 20 and row["rsum_mean"] == metrics(20, 10)["rsum"]
    assert row["split"] == "dev" and row["source"] == "dev/last val"
    assert any("last validation" in note for note in comp.notes)
    with pytest.raises(MaxMatchError, match="has no results of split 'test'") as info:
        cmp.compare_runs([run], split="test")
    assert "maxmatch evaluate" in info.value.hint
    assert cmp.compare_runs([run], split="dev").frame.loc[0, "i2t_r1_mean"] == 20


def test_run_folder_picks_the_evaluation_of_the_split(tmp_path):
    run = make_run(tmp_path / "r", 0, metrics(40, 20), val=[metrics(10, 5)])
    eval_json(run / "dev.json", metrics(50, 25), split="dev")
    assert cmp.compare_runs([run]).frame.loc[0, "i2t_r1_mean"] == 40  # the recipe's eval.split: test
    assert cmp.compare_runs([run], split="dev").frame.loc[0, "i2t_r1_mean"] == 50
    eval_json(run / "test-again.json", metrics(45, 20))
    with pytest.raises(MaxMatchError, match="several evaluation files") as info:
        cmp.compare_runs([run])
    assert "test-again.json" in str(info.value) and "--split" in info.value.hint


def test_evaluation_json_recipe_from_its_checkpoint_or_folder(tmp_path):
    run = make_run(tmp_path / "run", 1, header=True)
    (run / "recipe.toml").unlink()  # the header alone names the recipe and its seed
    inside = eval_json(tmp_path / "elsewhere.json", metrics(40, 20), checkpoint=str(run / "best.safetensors"))
    loose = eval_json(tmp_path / "loose.json", metrics(30, 20), checkpoint=str(tmp_path / "gone.safetensors"))
    comp = cmp.compare_runs([inside, loose])
    assert list(comp.frame["label"]) == ["demo", str(loose)]
    assert comp.frame.loc[0, "seeds"] == "1" and comp.frame.loc[1, "seeds"] == "?"
    assert comp.frame.loc[1, "similarity"] == "maxmatch"  # from the JSON when the recipe is unknown


def test_rescored_evaluation_is_its_own_row(tmp_path):
    run = make_run(tmp_path / "r", 0, metrics(40, 20))
    topk = eval_json(tmp_path / "topk.json", metrics(42, 20), similarity="topk",
                     checkpoint=str(run / "best.safetensors"))
    (tmp_path / "recipe.toml").write_text((run / "recipe.toml").read_text())  # topk.json's folder holds the recipe
    f = cmp.compare_runs([run, topk]).frame
    assert list(f["label"]) == ["demo", "demo (scored with topk)"] and list(f["n"]) == [1, 1]


def test_a_recipes_own_inference_is_not_a_rescoring(tmp_path):
    """A paper recipe trains with maxmatch and evaluates with top-k (§3.4): top-k is its own score, and exact
    matching is the rescoring."""
    run = make_run(tmp_path / "r", 0, overrides={"eval.similarity": "topk"})
    eval_json(run / "test.json", metrics(42, 20), similarity="topk")
    exact = eval_json(tmp_path / "exact.json", metrics(40, 20), similarity="maxmatch",
                      checkpoint=str(run / "best.safetensors"))
    (tmp_path / "recipe.toml").write_text((run / "recipe.toml").read_text())
    f = cmp.compare_runs([run, exact]).frame
    assert list(f["label"]) == ["demo", "demo (scored with maxmatch)"]


def two_similarities(path, topk, exact, checkpoint="best.safetensors"):
    """An evaluation JSON as `evaluate --similarity topk,maxmatch --json` writes it: "metrics" of the first."""
    eval_json(path, topk, similarity="topk", checkpoint=checkpoint)
    record = json.loads(path.read_text())
    record["by_similarity"] = {"topk": {"metrics": topk, "folds": []}, "maxmatch": {"metrics": exact, "folds": []}}
    path.write_text(json.dumps(record))
    return path


def test_an_evaluation_of_two_similarities_gives_a_row_each(tmp_path):
    run = make_run(tmp_path / "r", 0, overrides={"eval.similarity": "topk"})
    two_similarities(run / "test.json", metrics(42, 20), metrics(40, 21))
    f = cmp.compare_runs([run]).frame
    # the recipe's own inference labelled as before, the other one as a rescoring
    assert list(f["label"]) == ["demo", "demo (scored with maxmatch)"]
    assert list(f["rsum_mean"]) == [metrics(42, 20)["rsum"], metrics(40, 21)["rsum"]]
    assert list(f["t2i_r1_mean"]) == [20, 21]
    loose = two_similarities(tmp_path / "loose.json", metrics(42, 20), metrics(40, 21), checkpoint="gone")
    f = cmp.compare_runs([loose]).frame  # no recipe: no row is the own one, both say how they were scored
    assert list(f["label"]) == [f"{loose} (scored with topk)", f"{loose} (scored with maxmatch)"]
    assert list(f["i2t_r1_mean"]) == [42, 40]


def test_cli_compare_shows_every_similarity_of_an_evaluation(tmp_path):
    run = make_run(tmp_path / "r", 0, overrides={"eval.similarity": "topk"})
    two_similarities(run / "test.json", metrics(42, 20), metrics(40, 21))
    result = invoke(run, "--decimals", "1")
    assert result.exit_code == 0, result.output
    assert "demo (scored with maxmatch)" in result.output
    rows = [ln for ln in result.output.splitlines() if "demo" in ln and "│" in ln]
    assert len(rows) == 2 and "40.0" in rows[1] and "42.0" in rows[0]


def test_one_vector_runs_are_labelled_cosine_in_table3(tmp_path):
    """With K = 1 every set similarity scores the cosine: Table 3's column says so, not the similarity's name."""
    one = {"model.num_embeds": "1", "model.set_head": "pooled", "loss.similarity": "mil", "loss.gd_weight": "0",
           "loss.isd_weight": "0"}
    runs = [make_run(tmp_path / "mm", 0, metrics(40, 20)),
            make_run(tmp_path / "vsepp", 0, metrics(10, 5), {**one, "model.image_pool": "mean"}),
            make_run(tmp_path / "one", 0, metrics(15, 5), one)]
    table, _ = cmp.display_frame(cmp.compare_runs(runs), "table3")
    assert list(table["Similarity"]) == ["Maximal Pair Assignment", "Cosine, one vector (K = 1, VSE++: mean-pooled)",
                                         "Cosine, one vector (K = 1)"]


def test_table3_marks_from_the_recipes(tmp_path):
    runs = [make_run(tmp_path / "mm", 0, metrics(40, 20)),
            make_run(tmp_path / "ch", 0, metrics(30, 15), CHAMFER),
            make_run(tmp_path / "mil", 0, metrics(20, 10), MIL_NO_DIV)]
    comp = cmp.compare_runs(runs)
    table, _ = cmp.display_frame(comp, "table3")
    assert list(table.columns) == ["Similarity", "Div", "MMD", "GD", "ISD", "RSUM", "ΔRSUM", "n"]
    assert table.values.tolist() == [
        ["Maximal Pair Assignment", "✓", "✓", "✓", "✓", f"{metrics(40, 20)['rsum']:.1f}", "—", "1"],
        ["Smooth-Chamfer", "✓", "✓", "", "", f"{metrics(30, 15)['rsum']:.1f}", "-45.0", "1"],
        ["MIL", "", "✓", "", "", f"{metrics(20, 10)['rsum']:.1f}", "-90.0", "1"],
    ]
    latex = cmp.to_latex(comp, "table3")
    assert latex.split(r"\toprule")[1].count(r"\checkmark") == 7 and "amssymb" in latex


def demo_results(path):
    runs = [{"config": key, "seed": seed, "train_seconds": 1.0, "steps": 10, "metrics": metrics(base + seed, 20),
             "log_var_image": -1.0 - seed, "log_var_text": -2.0}
            for key, base in (("maxmatch", 40), ("chamfer", 30), ("mil", 20)) for seed in range(3)]
    commands = {"maxmatch": "maxmatch train --recipe demo ",
                "chamfer": "maxmatch train --recipe demo --set loss.similarity=chamfer --set loss.gd_weight=0 "
                           "--set loss.isd_weight=0",
                "mil": "maxmatch train --recipe demo --set loss.similarity=mil --set loss.gd_weight=0 "
                       "--set loss.isd_weight=0"}
    path.write_text(json.dumps({"date": "2025-01-01", "commit": "abc", "commands": commands, "runs": runs}))
    return path


def test_demo_results_rows_per_config(tmp_path):
    comp = cmp.compare_runs([demo_results(tmp_path / "demo_results.json")])
    f = comp.frame
    assert list(f["label"]) == ["maxmatch", "chamfer", "mil"] and list(f["n"]) == [3, 3, 3]
    assert f.loc[0, "i2t_r1_mean"] == 41 and f.loc[0, "i2t_r1_std"] == 1
    assert f.loc[0, "log_var_image_mean"] == -2 and f.loc[0, "log_var_image_std"] == 1
    assert list(f["similarity"]) == ["maxmatch", "chamfer", "mil"]
    assert list(f["gd_weight"]) == [0.1, 0.0, 0.0] and list(f["div_weight"]) == [0.01] * 3
    table, _ = cmp.display_frame(comp)
    assert list(table.columns)[-3:] == ["log Var. image", "log Var. text", "source"]
    assert table.loc[0, "i2t R@1"] == "41.0 ± 1.0" and table.loc[1, "ΔRSUM"] == "-30.0"
    with pytest.raises(MaxMatchError, match="split 'test', not 'dev'"):
        cmp.compare_runs([tmp_path / "demo_results.json"], split="dev")


def test_csv_reads_back_as_the_numbers(runs, tmp_path):
    demo, chamfer = runs
    comp = cmp.compare_runs([*demo, *chamfer])
    files = cmp.write_comparison(comp, csv=tmp_path / "out" / "c.csv", markdown=tmp_path / "c.md",
                                 latex=tmp_path / "c.tex")
    assert files == [tmp_path / "c.md", tmp_path / "c.tex", tmp_path / "out" / "c.csv"]
    back = pd.read_csv(tmp_path / "out" / "c.csv", keep_default_na=False)
    assert list(back["label"]) == list(comp.frame["label"])
    for column in [f"{m}_{s}" for m in cmp.METRICS for s in ("mean", "std")] + ["delta_rsum", "n", "gd_weight"]:
        assert back[column].tolist() == pytest.approx(comp.frame[column].tolist()), column
    assert back.loc[0, "inputs"] == "; ".join(map(str, demo))  # commas and semicolons quoted by pandas
    assert not list(tmp_path.rglob("*.tmp"))


def test_markdown_and_latex_hold_the_rows(runs):
    demo, chamfer = runs
    comp = cmp.compare_runs([*demo, *chamfer])
    md = cmp.to_markdown(comp).splitlines()
    assert md[0].startswith("|  | n | i2t R@1 |") and md[1].startswith("| --- | ---: |")
    assert md[2].startswith("| demo | 3 | 42.0 ± 2.0 |") and "—" in md[2]
    assert md[3].startswith("| demo loss.similarity=chamfer loss.gd_weight=0 loss.isd_weight=0 | 2 | 30.5 ± 0.7 |")
    latex = cmp.to_latex(comp, decimals=2)
    for rule in (r"\toprule", r"\midrule", r"\bottomrule", r"\begin{tabular}{lrrrrrrrrrl}"):
        assert rule in latex
    assert r"demo & 3 & 42.00 $\pm$ 2.00 &" in latex
    assert r"demo loss.similarity=chamfer loss.gd\_weight=0 loss.isd\_weight=0 & 2 & 30.50 $\pm$ 0.71" in latex
    assert r"$\Delta$RSUM" in latex and "booktabs" in latex.splitlines()[1]


def coco_metrics(protocol: str, base: float) -> dict:
    """ECCV Caption or CxC keys with distinct values: base + position (as evaluate --protocol eccv|cxc adds them)."""
    keys = {"eccv": ECCV_KEYS, "cxc": CXC_KEYS}[protocol]
    return {k: base + i for i, k in enumerate(keys)}


def test_eccv_and_cxc_layouts_average_the_evaluation_files(tmp_path):
    demo = [make_run(tmp_path / f"demo-s{s}", s) for s in range(2)]
    chamfer = make_run(tmp_path / "chamfer-s0", 0, overrides=CHAMFER)
    files = [eval_json(run / "eccv.json", {**metrics(40 + s, 20), **coco_metrics("eccv", 30 + 4 * s)},
                       split="testall", protocol="eccv") for s, run in enumerate(demo)]
    files.append(eval_json(chamfer / "eccv.json", {**metrics(30, 15), **coco_metrics("eccv", 10)},
                           split="testall", protocol="eccv"))
    comp = cmp.compare_runs(files)
    assert list(comp.frame["n"]) == [2, 1]
    table, _ = cmp.display_frame(comp, "eccv")
    # Headers name the metric family, so a pasted table is not read as the COCO 5K recalls RSUM sums.
    assert list(table.columns) == ["", "n", "ECCV i2t mAP@R", "ECCV i2t R-P", "ECCV i2t R@1", "ECCV t2i mAP@R",
                                   "ECCV t2i R-P", "ECCV t2i R@1", "5K RSUM", "ΔRSUM", "source"]
    # demo: eccv_i2t_map_at_r is 30 and 34 over the seeds -> 32.0 ± 2.8 (sample std); eccv_t2i_r1 is 35 and 39.
    assert table.loc[0, "ECCV i2t mAP@R"] == "32.0 ± 2.8" and table.loc[0, "ECCV t2i R@1"] == "37.0 ± 2.8"
    assert table.loc[1, "ECCV i2t mAP@R"] == "10.0" and table.loc[1, "source"] == "testall/eccv"
    assert table.loc[0, "5K RSUM"] == "241.5 ± 2.1"  # metrics(40 + s, 20): rsum 240 + 3 s -> 240 and 243
    md = cmp.to_markdown(comp, "eccv")
    assert "| demo | 2 | 32.0 ± 2.8 | 33.0 ± 2.8 |" in md and "ECCV Caption metrics (%)" in md
    for width in (80, 100):  # the terminal table fits: the title names the family, headers stay short
        console = Console(width=width, record=True, file=io.StringIO())
        console.print(cmp.rich_table(comp, "eccv", width=width))
        text = console.export_text()
        assert max(len(line) for line in text.splitlines()) <= width and "Comparison · ECCV Caption" in text
        assert "ΔRSUM" in text and "mAP@R" in text and "32.0" in text and "± 2.8" in text
    assert "5K RSUM: sum of the COCO 5K recalls" in cmp.to_latex(comp, "eccv")
    back = cmp.to_csv(comp)
    assert "eccv_t2i_rprecision_mean" in back.splitlines()[0]
    # No ECCV numbers in a row: the layout names it and says how to get them.
    plain = eval_json(tmp_path / "plain.json", metrics(50, 25))
    with pytest.raises(MaxMatchError, match=r"1 row\(s\) have no ECCV Caption metrics") as info:
        cmp.display_frame(cmp.compare_runs([*files, plain]), "eccv")
    assert "plain.json" in str(info.value) and "--protocol eccv" in info.value.hint
    with pytest.raises(MaxMatchError, match="no CxC metrics"):
        cmp.display_frame(comp, "cxc")
    cxc = [eval_json(tmp_path / f"cxc{s}.json", {**metrics(40, 20), **coco_metrics("cxc", 50 + s)},
                     split="testall", protocol="cxc") for s in range(2)]
    result = invoke(*cxc, "--layout", "cxc", "--group-by", "run")
    assert result.exit_code == 0, result.output
    assert "CxC" in result.output and "50.0" in result.output and "51.0" in result.output


def test_bad_input_raises_a_clear_error(tmp_path):
    (tmp_path / "nometrics.json").write_text('{"protocol": "full"}')
    (tmp_path / "broken.json").write_text('{"metrics": ')
    (tmp_path / "partial.json").write_text('{"metrics": {"rsum": 1}}')
    (tmp_path / "plain").mkdir()
    empty_run = make_run(tmp_path / "empty", 0)
    cases = {tmp_path / "missing.json": "does not exist", tmp_path / "nometrics.json": "holds no metrics",
             tmp_path / "broken.json": "not valid JSON", tmp_path / "partial.json": "has no i2t_r1",
             tmp_path / "plain": "is not a run folder", empty_run: "has no results"}
    for path, message in cases.items():
        with pytest.raises(MaxMatchError, match=message):
            cmp.load_results([path])


runner = CliRunner()


def invoke(*args):
    return runner.invoke(app, ["compare", *map(str, args)])


def test_cli_prints_the_table_and_announces_files(runs, tmp_path):
    demo, chamfer = runs
    md, tex, csv = tmp_path / "t.md", tmp_path / "t.tex", tmp_path / "t.csv"
    result = invoke(*demo, *chamfer, "--markdown", md, "--latex", tex, "--csv", csv, "--layout", "table3")
    assert result.exit_code == 0, result.output
    assert "Maximal Pair Assignment" in result.output and "Smooth-Chamfer" in result.output
    assert "ΔRSUM against 'demo'" in result.output
    for path in (md, tex, csv):
        assert f"wrote {path}\n" in result.output and path.is_file()


@pytest.mark.parametrize("case, message", [
    ("missing", "does not exist"), ("nometrics", "holds no metrics"), ("empty", "has no results"),
    ("group", "unknown --group-by"), ("layout", "unknown --layout"), ("baseline", "matches no row"),
    ("nan", "i2t_r1 is nan, not a finite number"), ("string", "rsum is '37.8', not a finite number"),
    ("bool", "t2i_r5 is True, not a finite number"), ("eccv-inf", "eccv_i2t_r1 is inf, not a finite number"),
    ("figure", "names no file"), ("csv-folder", "is a folder; an output file cannot replace it"),
])
def test_cli_bad_input_exits_2_without_traceback(tmp_path, case, message):
    good = eval_json(tmp_path / "good.json", metrics(40, 20))
    (tmp_path / "nometrics.json").write_text('{"runs_are": []}')
    make_run(tmp_path / "empty", 0)
    broken = {"nan": {"i2t_r1": float("nan")}, "string": {"rsum": "37.8"}, "bool": {"t2i_r5": True},
              "eccv-inf": {"eccv_i2t_r1": float("inf")}}
    if case in broken:
        eval_json(tmp_path / "broken.json", {**metrics(40, 20), **broken[case]})
    (tmp_path / "a-folder").mkdir()
    args = {"missing": [tmp_path / "missing"], "nometrics": [tmp_path / "nometrics.json"],
            "empty": [tmp_path / "empty"], "group": [good, "--group-by", "seed"],
            "layout": [good, "--layout", "table9"], "baseline": [good, "--baseline", "nothing"],
            "figure": [good, "--figure", ""], "csv-folder": [good, "--csv", tmp_path / "a-folder"],
            **{c: [good, tmp_path / "broken.json"] for c in broken}}[case]
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split()) and "Traceback" not in result.output
    assert result.output.count("error:") == 1
    assert [p.name for p in (tmp_path / "a-folder").iterdir()] == []


@pytest.mark.parametrize("width", [100, 120, 160])
def test_terminal_table_is_never_cropped(width):
    """Every column (ΔRSUM last) and every mean and std is on screen at the widths of terminals and CI logs."""
    from pathlib import Path

    from rich.console import Console

    from maxmatch_cli.reporting.compare import compare_runs, rich_table

    comp = compare_runs([Path(__file__).resolve().parents[2] / "benchmarks" / "demo_results.json"])
    console = Console(width=width, record=True, file=io.StringIO())
    console.print(rich_table(comp, width=width))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width
    assert "ΔRSUM" in text and "log Var. text" in text
    for mean, std in zip(comp.frame["rsum_mean"], comp.frame["rsum_std"]):
        assert f"{mean:.1f}" in text and f"± {std:.1f}" in text
