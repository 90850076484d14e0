"""The scripts of tools/: the benchmark's figures, the paper's analysis (Figs. 2, 4, 6, 7), the workshop,
and speed.md's gathering of GPU stages. tools/ is imported here only to test it."""

import json
import math
import re
import sys
import time
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from conftest import TINY, run_train
from hypothesis import given
from hypothesis import strategies as st

from dense import train as dense_train
from mpvg import PE_MODES, create_model
from tools import analyze, benchmark, dense_benchmark, speed, workshop
from training import engine, flags


def count(model):
    return sum(p.numel() for p in model.parameters())


def randomise(model, seed=0):
    """Every parameter random, LayerNorm affines included, so that no zero bias hides a wiring error."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=g, dtype=p.dtype)
            p.copy_(1.0 + 0.3 * noise if name.endswith("weight") and p.ndim == 1 else 0.3 * noise)
    return model


@st.composite
def configs(draw):
    """A small model of any PE mode, pooling it allows and Last-LN PE it allows."""
    pe = draw(st.sampled_from(list(PE_MODES)))
    depth, pool = draw(st.integers(1, 3)), draw(st.sampled_from(["cls", "gap"]))
    layers = {"none": [], "all": list(range(depth)), "skip0": list(range(1, depth))}[
        PE_MODES[pe]["pe_layers"]
    ]
    last = draw(st.sampled_from([None, 0, *layers])) if pool == "gap" else None
    return dict(
        pe=pe, pool=pool, last_pe=last, depth=depth, img_size=8, patch_size=4, dim=8, heads=2, num_classes=3
    )


def test_benchmark_compares_each_mode_with_default_pooled_alike(capsys, monkeypatch):
    """Each row's step is made to take a known time on a clock the test advances (hours, so the real
    time on top is noise well under 1%, however busy the CPU): the benchmark's seconds, rates and
    comparisons can then be checked exactly."""
    costs = {
        ("default", "cls"): 1e4,
        ("default", "gap"): 2e4,
        ("lape", "cls"): 3e4,
        ("pvg", "gap"): 4e4,
        ("mpvg", "gap"): 5e4,
        None: 5e3,
    }
    clock = [0.0]

    train_step = engine.train_step

    def timed_step(model, *args, **kwargs):
        train_step(model, *args, **kwargs)
        cfg = getattr(model, "cfg", None)  # timm's twins have none
        clock[0] += costs[(cfg.pe, cfg.pool) if cfg else None]

    monkeypatch.setattr(benchmark, "train_step", timed_step)
    monkeypatch.setattr(
        benchmark, "time", SimpleNamespace(perf_counter=lambda: time.perf_counter() + clock[0])
    )
    rows = benchmark.main(
        [*TINY, "--model", "vit_lite_7_4", "--steps", "2", "--rounds", "1", "--warmup", "2"]
    )
    names = ["default (cls)", "default (gap)", "lape (cls)", "pvg (gap)", "mpvg (gap)"]
    assert {f"mpvg.py {n}" for n in names} | {"data loader"} <= set(rows)
    cfg = dict(img_size=16, dim=32, depth=2, heads=2)
    for name in names:  # each row is that mode with that pooling, not one model five times
        mode, pool = name[:-6], name[-4:-1]
        row = rows[f"mpvg.py {name}"]
        assert row["params"] == count(create_model("vit_lite_7_4", pe=mode, pool=pool, **cfg))
        seconds = costs[(mode, pool)]
        assert row["first_step_s"] == pytest.approx(seconds, rel=0.01)  # the first step alone, in s
        assert row["ms_per_step"] == pytest.approx(1e3 * seconds, rel=0.01)  # per step, not per round
        assert row["images_per_sec"] == pytest.approx(16 / seconds, rel=0.01)
    out = capsys.readouterr().out
    assert "1st step s" in out and "vs default" in out and "data loader alone" in out
    table = {line.split("  ")[0]: line.split() for line in out.splitlines() if line.startswith("mpvg.py")}
    assert table["mpvg.py pvg (gap)"][-1] == "0.500"  # vs default (gap): pooled alike
    assert table["mpvg.py lape (cls)"][-1] == "0.333"  # vs default (cls)
    if "timm ViT (gap)" in rows:
        assert table["mpvg.py mpvg (gap)"][-2] == "0.100"  # vs timm pooled alike


def test_flops_count_matches_a_hand_count():
    """DeiT-S forward: 4.6 GFLOPs as usually quoted (fvcore counts a multiply-add as one: 4.6 GMACs)."""
    cfg = create_model("deit_small").cfg
    assert benchmark.flops_per_image(cfg) / 2 == pytest.approx(4.6e9, rel=0.01)


@given(st.integers(2, 50), st.floats(0.1, 10), st.floats(-5, 5), st.integers(0, 2**16))
def test_pearson_of_a_tensor_with_itself_its_negation_and_an_affine_copy(n, scale, shift, seed):
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(seed))
    assert analyze.pearson(x, x) == pytest.approx(1.0, abs=1e-9)
    assert analyze.pearson(x, -x) == pytest.approx(-1.0, abs=1e-9)
    assert analyze.pearson(x, scale * x + shift) == pytest.approx(1.0, abs=1e-6)


@given(st.integers(3, 60), st.integers(0, 2**16), st.floats(-0.9, 0.9))
def test_pearson_equals_its_textbook_formula_on_correlated_data(n, seed, rho):
    """r = cov(a, b) / (sd(a) sd(b)), written with plain sums, on data of a chosen correlation."""
    g = torch.Generator().manual_seed(seed)
    a = torch.randn(n, 2, generator=g, dtype=torch.float64)
    b = rho * a + math.sqrt(1 - rho**2) * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x, y = a.flatten().tolist(), b.flatten().tolist()
    mx, my = sum(x) / len(x), sum(y) / len(y)
    cov = sum((u - mx) * (v - my) for u, v in zip(x, y))
    r = cov / math.sqrt(sum((u - mx) ** 2 for u in x) * sum((v - my) ** 2 for v in y))
    assert analyze.pearson(a, b) == pytest.approx(r, abs=1e-9)


@given(configs(), st.integers(1, 3))
def test_analysis_reads_what_the_forward_computes(kw, batch):
    """Figs. 2, 4, 7 and the Appendix's statistics, each against an independent computation: forward hooks
    (another path than the trace) for the tokens and PE, and F.layer_norm from the parameters for the
    Last LN's output and Eq. (11), on a model whose every parameter is random."""
    model = randomise(create_model("deit_tiny", **kw)).double().eval()
    cfg = model.cfg
    seen = {}

    def keep(name):
        return lambda module, inputs, output: seen.__setitem__(name, (inputs[0], output))

    hooks = [b.norm1.register_forward_hook(keep(f"norm1.{l}")) for l, b in enumerate(model.blocks)]
    hooks += [
        b.pe_norm.register_forward_hook(keep(f"pe.{l}")) for l, b in enumerate(model.blocks) if b.pe_norm
    ]
    hooks.append(model.norm.register_forward_hook(keep("norm")))
    img = torch.randn(batch, 3, 8, 8, dtype=torch.float64)
    stats = analyze.analyse(model, img)
    for h in hooks:
        h.remove()
    for l in range(cfg.depth):
        torch.testing.assert_close(stats["fig2_tokens"][l], seen[f"norm1.{l}"][1].mean(dim=0))
        if f"pe.{l}" in seen:
            torch.testing.assert_close(stats["fig2_pos"][l], seen[f"pe.{l}"][1][0])
            assert stats["fig4_correlation"][l] == pytest.approx(
                analyze.pearson(stats["fig2_tokens"][l], stats["fig2_pos"][l])
            )
        else:
            assert stats["fig2_pos"][l] is None and stats["fig4_correlation"][l] is None
    before, _ = seen["norm"]
    ln = lambda t, m: F.layer_norm(t, (cfg.dim,), m.weight, m.bias, cfg.norm_eps)  # noqa: E731
    after = ln(before, model.norm)
    if cfg.last_pe is not None:  # Eq. (11), the PE pos_k through its own LayerNorm
        pos_k = model.pos_embed if cfg.last_pe == 0 else seen[f"pe.{cfg.last_pe}"][1]
        after = after + ln(pos_k, model.last_pe_norm)
    pool = (lambda t: t[:, 0]) if cfg.pool == "cls" else (lambda t: t.mean(1))
    cosine = F.cosine_similarity(pool(before).mean(0), pool(after).mean(0), dim=0).detach()
    assert stats["last_ln"]["cosine"] == pytest.approx(cosine.item(), abs=1e-9)
    assert stats["last_ln"]["beta_var"] == pytest.approx(
        ((model.norm.bias - model.norm.bias.mean()) ** 2).mean().item()
    )
    assert stats["last_ln"]["gamma_var"] == pytest.approx(
        ((model.norm.weight - model.norm.weight.mean()) ** 2).mean().item()
    )
    assert stats["last_ln"]["beta_var"] > 0  # random parameters: the fresh LayerNorm's 0 cannot pass
    g = cfg.img_size // cfg.patch_size
    n = g * g
    torch.testing.assert_close(stats["fig7_norms_pre"], before[:, -n:].norm(dim=-1).reshape(batch, g, g))
    torch.testing.assert_close(stats["fig7_norms_post"], after[:, -n:].norm(dim=-1).reshape(batch, g, g))


def test_analyze_writes_the_figures_of_a_new_model_and_names_a_checkpoint_by_its_run(tmp_path, capsys):
    """Every figure and analysis.json, whose numbers agree with its own heatmaps; a new model is seeded, so
    its figures are the same every time; a checkpoint is analysed on its own data and named by its run and
    epoch, not by a path of the machine."""
    out, tiny = tmp_path / "analysis", ["--img-size", "16", "--dim", "32", "--depth", "3", "--heads", "2"]
    analyze.main([*tiny, "--pe", "lape", "--images", "8", "--out", str(out)])
    names = {"fig2_heatmaps.png", "fig4_correlation.png", "fig6_last_ln.png", "fig7_token_norms.png"}
    assert names | {"analysis.json"} <= {p.name for p in out.iterdir()}
    report = json.loads((out / "analysis.json").read_text())
    assert report["last_ln"]["beta_var"] == 0.0 and len(report["fig4_correlation"]) == 3  # a new model's
    for l in range(3):
        r = analyze.pearson(torch.tensor(report["fig2_tokens"][l]), torch.tensor(report["fig2_pos"][l]))
        assert r == pytest.approx(report["fig4_correlation"][l], abs=1e-3)
    analyze.main([*tiny, "--pe", "lape", "--images", "8", "--out", str(tmp_path / "again")])
    assert (
        json.loads((tmp_path / "again/analysis.json").read_text())["fig4_correlation"]
        == report["fig4_correlation"]
    )
    run_train(tmp_path, "--epochs", "1", name="mpvg_run")
    capsys.readouterr()
    analyze.main(
        ["--checkpoint", str(tmp_path / "mpvg_run/best.pt"), "--images", "4", "--out", str(tmp_path / "f")]
    )
    assert json.loads((tmp_path / "f/analysis.json").read_text())["source"] == "mpvg_run/best.pt (epoch 1)"
    assert capsys.readouterr().out.startswith(
        "analysis of mpvg_run/best.pt (epoch 1) over 4 synthetic images"
    )
    with pytest.raises(SystemExit, match="--dim differs from the checkpoint's"):
        analyze.main(["--checkpoint", str(tmp_path / "mpvg_run/best.pt"), "--dim", "16"])


def test_the_workshop_learns_where_the_plus_is_only_with_pe(capsys):
    """Two of the workshop's models, trained shorter: without PE a GAP model stays near the commonest
    cell's share it cannot beat; with PVG's PE it learns well above it. Each row is its own model."""
    models = [("none", "gap"), ("pvg", "gap")]
    rows = workshop.workshop(epochs=4, train_size=2048, val_size=512, models=models)
    assert [(r["pe"], r["pool"]) for r in rows] == models
    assert rows[0]["top1"] < 14 and rows[1]["top1"] > 25, rows
    for r in rows:
        assert r["params"] == count(
            create_model("deit_tiny", pe=r["pe"], pool=r["pool"], **workshop.TINY_VIT)
        )
    assert "top-1" in capsys.readouterr().out


def test_speed_md_gathers_the_stages_of_several_calls_each_with_its_own_machine(tmp_path, monkeypatch):
    """speed.py is run a few stages at a time (a GPU may be at hand for minutes): speed.md holds every
    stage's figures so far, each row saying when, on what and with which torch it ran; a stage run again
    replaces its figures."""

    def stage(name, rate=None):  # a stand-in for a benchmark run: writes its JSON, or fails
        rows = {"mpvg.py mpvg (gap)": dict(images_per_sec=rate, ms_per_step=2.0, first_step_s=0.5)}
        code = f"open({str(tmp_path / name)!r} + '.json', 'w').write({json.dumps(dict(rows=rows))!r})"
        # while it runs, stages.json no longer claims its older run: a machine gone now leaves no false row
        unclaimed = f"import json; assert {name!r} not in json.load(open({str(tmp_path / 'stages.json')!r}))"
        return [(name, [sys.executable, "-c", f"{unclaimed}; {code}" if rate else "raise SystemExit(3)"], 60)]

    plan = {"a": stage("a", 111.0), "b": stage("b", 222.0), "c": stage("c")}
    monkeypatch.setattr(speed, "stages", lambda quick, out, cores: plan)
    monkeypatch.setattr(
        speed, "machine", lambda: dict(date="2026-01-01 10:00", device="GPU one", torch="2.11")
    )
    speed.main(["--out", str(tmp_path), "--stages", "a,b"])
    monkeypatch.setattr(
        speed, "machine", lambda: dict(date="2026-01-02 11:00", device="GPU two", torch="2.14")
    )
    plan["b"] = stage("b", 333.0)
    speed.main(["--out", str(tmp_path), "--stages", "b,c"])
    md = (tmp_path / "speed.md").read_text()
    assert re.search(r"^\| a \| 2026-01-01 10:00 \| GPU one \| 2.11 \| \d+ \| ok \|$", md, re.M)
    assert re.search(r"^\| b \| 2026-01-02 11:00 \| GPU two \| 2.14 \| \d+ \| ok \|$", md, re.M)
    assert re.search(r"^\| c \| 2026-01-02 11:00 \| GPU two \| 2.14 \| \d+ \| failed \(exit 3", md, re.M)
    figures = re.findall(r"^## (\w+)\n\n.*\n.*\n\| mpvg.py mpvg \(gap\) \| ([\d.]+) \|", md, re.M)
    assert figures == [("a", "111.0"), ("b", "333.0")]  # b's first figures replaced; c wrote none
    plan["a"] = stage("a")  # a rerun that fails: its good figures are kept aside, not gathered
    speed.main(["--out", str(tmp_path), "--stages", "a"])
    assert (
        json.loads((tmp_path / "previous/a.json").read_text())["rows"]["mpvg.py mpvg (gap)"]["images_per_sec"]
        == 111
    )
    assert "## a" not in (tmp_path / "speed.md").read_text()
    for stages, message in (("a,,b", "unknown stage.s. '' in --stages 'a,,b'"), ("", "unknown stage.s. ''")):
        with pytest.raises(SystemExit, match=f"^speed.py: error: {message}"):
            speed.main(["--out", str(tmp_path), "--stages", stages])
    (tmp_path / "stages.json").write_text('{"a": ')  # cut short
    with pytest.raises(SystemExit, match="stages.json is unreadable: move it away"):
        speed.main(["--out", str(tmp_path), "--stages", "a"])
    with pytest.raises(SystemExit, match="cannot use --out .*speed.md .NotADirectoryError"):
        speed.main(["--out", str(tmp_path / "speed.md"), "--stages", "a"])


def test_every_speed_stage_is_a_command_its_script_takes(tmp_path):
    """The GPU stages, full size and rehearsed: each command's flags are ones its script accepts."""
    for quick in (False, True):
        for runs in speed.stages(quick, tmp_path, cores=16).values():
            for name, command, limit in runs:
                script = next(
                    (w for w in command if w in ("tools.benchmark", "tools.dense_benchmark")), "train.py"
                )
                argv = command[command.index(script) + 1 :]
                if script == "tools.benchmark":
                    benchmark.parse_args(argv)
                elif script == "tools.dense_benchmark":
                    rest = dense_benchmark.build_parser().parse_known_args(argv)[1]
                    dense_train.build_parser().parse_args(["--task", "coco", *rest])
                else:
                    flags.build_parser().parse_args(argv)
                assert limit > 0, name


@pytest.mark.parametrize("name", ["ceit_tiny", "t2t_vit_7"])
def test_analyze_gives_fig_4_of_ceit_and_t2t_vit(tmp_path, name):
    """Fig. 4's correlations for the paper's CeiT-Ti and T2T-ViT-7 (MPVG: none at layer 0, one a layer
    after), each r that of the heatmaps beside it; Swin, whose stages change the grid, is refused."""
    tiny = ["--model", name, "--img-size", "32", "--dim", "16", "--depth", "3", "--heads", "2"]
    report = analyze.main([*tiny, "--images", "4", "--out", str(tmp_path / name)])
    assert report["fig4_correlation"][0] is None and len(report["fig4_correlation"]) == 3
    for l in (1, 2):
        r = analyze.pearson(report["fig2_tokens"][l], report["fig2_pos"][l])
        assert r == pytest.approx(report["fig4_correlation"][l], abs=1e-3)
    with pytest.raises(SystemExit, match="one token grid a layer.*not swin_tiny's"):
        analyze.main(["--model", "swin_tiny", "--out", str(tmp_path / "swin")])


def test_the_benchmark_times_swin_beside_timms():
    """Swin-Ti's four modes, all averaging, beside timm's SwinTransformer built to the same size; no MFU,
    which counts ViT's FLOPs alone."""
    pytest.importorskip("timm")
    tiny = ["--model", "swin_tiny", "--img-size", "16", "--patch-size", "2", "--window", "2", "--dim", "8"]
    rows = benchmark.main([*tiny, "--heads", "1", "--batch-size", "2", "--steps", "1", "--rounds", "1"])
    assert [r for r in rows if r != "data loader"] == [
        "mpvg.py default (gap)",
        "mpvg.py lape (gap)",
        "mpvg.py pvg (gap)",
        "mpvg.py mpvg (gap)",
        "timm Swin (gap)",
    ]
    assert rows["timm Swin (gap)"]["params"] == rows["mpvg.py default (gap)"]["params"] - 64 * 8  # no APE
    assert all(r.get("mfu") is None for r in rows.values())


@pytest.mark.parametrize("rows", ["foo", "mpvg", "mpvg:gap,rope:gap", "mpvg:mean", ""])
def test_benchmark_rows_that_are_no_mode_and_pooling_are_one_line(capsys, rows):
    with pytest.raises(SystemExit) as refused:
        benchmark.main(["--rows", rows])
    err = capsys.readouterr().err
    assert refused.value.code == 2 and err.count("\n") == 1 and "is no PE mode:pooling" in err, err


@pytest.mark.parametrize("tool", [analyze, benchmark])
def test_the_tools_help_lists_train_pys_flags_and_checks_them(tool, capsys):
    """Their docs say they take train.py's flags: --help lists them, and a bad value is one line."""
    with pytest.raises(SystemExit):
        tool.main(["--help"])
    listed = capsys.readouterr().out
    assert all(flag in listed for flag in ("--lr", "--pe", "--data-path", "--img-size", "--recipe"))
    with pytest.raises(SystemExit) as refused:
        tool.main(["--lr", "1e39"])
    assert (
        refused.value.code == 2 and "argument --lr: must be in (0, 10], got 1e39" in capsys.readouterr().err
    )


@pytest.mark.parametrize("task", ["coco", "ade20k"])
def test_the_dense_benchmark_times_a_step_and_the_deformable_attentions_share(task):
    """tools.dense_benchmark's row for a tiny head: a step's time, its deformable attention's share of it
    (each of the 10 calls, 4 injectors and 6 extractors, replayed), and the real deform_attn put back."""
    from dense import adapter

    original, seen = adapter.deform_attn, []
    tiny = ["--dim", "48", "--depth", "4", "--heads", "2", "--head-width", "16", "--batch-size", "2"]
    counted = lambda *inputs: seen.append(1) or original(*inputs)  # noqa: E731
    adapter.deform_attn = counted
    try:
        row = dense_benchmark.measure(task, 64, 1, tiny)
    finally:
        adapter.deform_attn = original
    assert row["step_s"] > 0 and 0 < row["deform_share"] < 1 and row["peak_mib"] > 0
    assert len(seen) == 2 * 2 * 10  # two steps, each call run in the step and once more alone
