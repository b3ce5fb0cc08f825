"""lora_ext.bench: the GPU forward benchmark on tiny CPU layers, and the rehearsal of the whole CUDA run on the
CPU (`lora-ext bench --rehearse`), which must run every row the GPU run would."""
import functools
import json

import pytest
import torch

from lora_ext import bench, bench_batched, bench_lossless, bench_targets, cli, ops


def test_forward_kernel_rows_run_on_cpu():
    rows = bench.forward_kernel_rows("cpu", torch.float32, repeats=1, dim=32, r=2, merged_r=2, tokens=(1, 3))
    cases = {row["case"] for row in rows}
    assert "forward Linear(32, 32) r=2 M=1" in cases
    assert "forward+backward Linear(32, 32) r=2 M=3" in cases
    assert "forward MergedLinear(32, 96) r=2 [T,F,T] M=3" in cases
    for row in rows:
        assert row["ratio"] > 0
        if row["impl"] == "lora_ext" and "target" in row:
            assert "met" in row
    bench.format_table(dict(device="cpu", machine="test", dtype="float32", torch=torch.__version__, date="",
                            rows=rows))


def test_train_rows_compare_a_training_step_with_loralib_and_peft():
    """The CPU run's forward+backward rows: every implementation timed on the same step, its ratio to the plain
    layer's, and lora_ext's speed-up over each other library (no target)."""
    rows = bench._train_rows("cpu", torch.float32, repeats=1, dim=16, r=2, tokens=(1, 3))
    for m in (1, 3):
        case = f"forward+backward Linear(16, 16) r=2 tokens={m}"
        timed = {row["impl"]: row for row in rows if row["case"] == case}
        assert set(timed) >= {"plain", "lora_ext", "loralib", "peft"}, timed
        assert timed["plain"]["ratio"] == 1.0
        for impl, row in timed.items():
            assert row["ms"] > 0 and abs(row["ratio"] - row["ms"] / timed["plain"]["ms"]) < 1e-9
        for other in ("loralib", "peft"):
            (speedup,) = [row for row in rows if row["case"] == f"{case}: lora_ext speed-up over {other}"]
            assert abs(speedup["ratio"] - timed[other]["ms"] / timed["lora_ext"]["ms"]) < 1e-9
            assert "target" not in speedup


def _spy(monkeypatch, module, name, calls):
    """Replaces module.name by a wrapper that records (args, kwargs, result) of every call in calls[name]."""
    real = getattr(module, name)
    calls[name] = []

    @functools.wraps(real)
    def spy(*args, **kwargs):
        result = real(*args, **kwargs)
        calls[name].append((args, kwargs, result))
        return result
    monkeypatch.setattr(module, name, spy)


def test_rehearsal_runs_every_cuda_row(tmp_path, capsys, monkeypatch):
    pytest.importorskip("lora_ext._sim", reason="a rehearsal needs lora_ext._sim")
    dim = 16
    calls = {}
    # every public row function of the bench, and every target check, spied on: the CUDA run must call
    # each, and every row each returned must be in the table and the JSON
    row_functions = sorted(n for n in dir(bench) if n.endswith("_rows") and not n.startswith("_")
                           and callable(getattr(bench, n)))
    assert {"merge_kernel_rows", "forward_kernel_rows", "switch_rows"} <= set(row_functions)
    for name in row_functions:
        _spy(monkeypatch, bench, name, calls)
    _spy(monkeypatch, bench_targets, "fields", calls)
    kernels = ops._kernels

    path = tmp_path / "bench.json"
    # a CUDA-only row that raises fails here
    assert cli.main(["bench", "--device", "cuda", "--quick", "--rehearse", "--dim", str(dim),
                     "--json", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads(path.read_text())

    # it says it is a rehearsal, and judges nothing
    assert out.startswith("REHEARSAL: not a measurement")
    assert result["rehearsal"] is True and result["note"].startswith("REHEARSAL: not a measurement")
    assert result["device"] == "cuda" and "REHEARSAL" in result["machine"]
    assert result["dtype"] == "bfloat16"
    table = [line for line in out.splitlines() if line.startswith("| ") and not line.startswith("| case ")]
    assert len(table) == len(result["rows"])
    for row, line in zip(result["rows"], table):
        assert line.startswith(f"| {row['case']} | {row['impl']} |")
        met = line.strip().strip("|").split("|")[-1].strip()
        if "target" in row:
            assert row["met"] is None and met == "-", line
        else:
            assert "met" not in row and met == "", line

    # every row function ran, and every row it returned is in the output
    cases = {(row["case"], row["impl"]) for row in result["rows"]}
    for name in row_functions:
        assert calls[name], f"the rehearsed CUDA run did not call bench.{name}"
        for _, _, rows in calls[name]:
            assert rows
            missing = {(row["case"], row["impl"]) for row in rows} - cases
            assert not missing, f"rows of bench.{name} missing from the output: {sorted(missing)}"
    # the CUDA-only rows: CUDA graph replay, the merge kernels at both widths, the switch at twice the width
    assert any(case.endswith(", CUDA graph replay") for case, _ in cases)
    assert {shape for args, _, _ in calls["merge_kernel_rows"] for shape in args[3]} == set(
        bench.gpu_merge_shapes(dim))
    assert {args[0] for args, _, _ in calls["switch_rows"]} == {dim, 2 * dim}
    # every target of the table was checked by the CUDA run
    assert {args[0] for args, _, _ in calls["fields"]} == {
        key for key, t in bench_targets.TARGETS.items() if "cuda" in t.devices}

    # the rehearsal is over: the shim and the kernels are the real ones again
    assert bench._cuda.rehearsal is False and ops._kernels is kernels


def test_rehearsal_is_of_the_cuda_run(capsys):
    assert cli.main(["bench", "--device", "cpu", "--rehearse"]) == 2
    assert "--rehearse rehearses the CUDA run" in capsys.readouterr().err
    with pytest.raises(ValueError):
        bench.run(device="cpu", rehearse=True)


def test_a_comparison_that_cannot_be_captured_is_a_row_not_the_end(monkeypatch):
    # loralib's MergedLinear indexes with a CPU mask: on some torch versions its CUDA graph capture raises. That
    # row says so; the others are measured; a failure to capture lora_ext itself still stops the run.
    pytest.importorskip("lora_ext._sim", reason="a rehearsal needs lora_ext._sim")
    pytest.importorskip("loralib")
    real = bench._graph_replay

    def fussy(victim):
        def graph_replay(modules, x):
            if victim in type(modules[0]).__module__:
                raise RuntimeError("operation not permitted when stream is capturing\nsecond line")
            return real(modules, x)
        return graph_replay

    monkeypatch.setattr(bench, "_graph_replay", fussy("loralib"))
    with bench.rehearsing():
        rows = bench.forward_kernel_rows("cuda", torch.float32, 1, dim=16, r=2, merged_r=2, tokens=(1,))
    refused = [r for r in rows if "not capturable" in r["impl"]]
    assert [r["impl"] for r in refused] == ["loralib: not capturable (operation not permitted when stream is "
                                            "capturing)"] * 2
    graph_rows = [r for r in rows if "CUDA graph replay" in r["case"] and "ms" in r]
    assert {r["impl"] for r in graph_rows} >= {"plain", "lora_ext"} and all(r["ms"] > 0 for r in graph_rows)
    monkeypatch.setattr(bench, "_graph_replay", fussy("lora_ext"))
    with bench.rehearsing(), pytest.raises(RuntimeError, match="stream is capturing"):
        bench.forward_kernel_rows("cuda", torch.float32, 1, dim=16, r=2, merged_r=2, tokens=(1,))


def test_a_run_stopped_by_sigterm_keeps_its_rows(tmp_path, capsys, monkeypatch):
    # bench/gpu_check.sh stops the benchmark step with `timeout` (SIGTERM): the rows measured so far go to the
    # JSON and the table, marked incomplete, and the exit status says it did not finish
    import os
    import signal
    pytest.importorskip("lora_ext._sim", reason="a rehearsal needs lora_ext._sim")
    real = bench.forward_kernel_rows

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)  # the handler raises at the next bytecode
        return real(*args, **kwargs)

    monkeypatch.setattr(bench, "forward_kernel_rows", killed)
    before = signal.getsignal(signal.SIGTERM)
    path = tmp_path / "bench.json"
    assert cli.main(["bench", "--device", "cuda", "--quick", "--rehearse", "--dim", "16", "--json", str(path)]) == 1
    assert signal.getsignal(signal.SIGTERM) is before
    result = json.loads(path.read_text())
    n = len(result["rows"])
    assert n > 0 and result["incomplete"] == f"stopped by SIGTERM, after {n} rows" and result["rehearsal"]
    assert any(r["case"].startswith("merge ") or "merge" in r["case"] for r in result["rows"])
    assert not any("CUDA graph replay" in r["case"] for r in result["rows"])  # nothing after the stop
    assert all(r.get("met") is None for r in result["rows"] if "met" in r)
    captured = capsys.readouterr()
    assert f"INCOMPLETE: stopped by SIGTERM, after {n} rows" in captured.out
    assert "stopped by SIGTERM" in captured.err


def test_the_shim_off_a_rehearsal_is_torch_cuda():
    shim = bench.CudaShim()
    assert shim.place("cuda") == "cuda" and shim.place("cpu") == "cpu"
    assert shim.is_available() == torch.cuda.is_available()
    pytest.importorskip("lora_ext._sim", reason="a rehearsal needs lora_ext._sim")
    with bench.rehearsing() as rehearsal:
        assert bench._cuda is rehearsal and rehearsal.place("cuda") == "cpu" and rehearsal.is_available()
        assert rehearsal.capture(lambda: torch.is_grad_enabled())() is False  # replays run under no_grad
    assert bench._cuda is not rehearsal and not bench._cuda.rehearsal


def test_the_sanitizer_suite_reaches_every_forward_variant_and_the_tensor_core_merges():
    """bench/sanitize_cases.py (gpu_check.sh runs it under compute-sanitizer), rehearsed through the simulator:
    every case passes and the suite reaches the kernel variants a sanitizer pass must cover."""
    import importlib.util
    import pathlib
    sim = pytest.importorskip("lora_ext._sim")
    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "sanitize_cases.py"
    spec = importlib.util.spec_from_file_location("sanitize_cases", path)
    sc = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sc)
    assert sc.main(["--rehearse"]) == 0
    seen = set()
    from lora_ext import ops
    with ops.use_kernels(sim, "cpu"):
        for _, fn in sc.cases("cpu"):
            fn()
            seen.add(sim.last_variant())
    for t in ("Float", "Half", "BFloat16"):
        for vec in (0, 1):
            assert any(v.startswith(f"forward<{t},") and v.endswith(f"vector={vec}>") for v in seen), (t, vec, seen)
    for t in ("Half", "BFloat16"):
        assert f"merge<W={t}, factors={t}, tensor_core=1, vector=1>" in seen


@pytest.mark.parametrize("dim, widths", [(16, {16}), (4096, {1024, 4096})])
def test_the_mixed_batch_rows_of_a_cpu_run_are_at_its_width(monkeypatch, dim, widths):
    # `lora-ext bench --dim 16` measured its mixed-batch rows at widths 1024 and 4096 whatever --dim said; the
    # default width keeps the targets' widths. The other rows are stubbed out: only the widths are checked.
    seen = []
    monkeypatch.setattr(bench_batched, "case_rows", lambda dim, *a, **k: seen.append(dim) or [])
    monkeypatch.setattr(bench, "merge_case", lambda *a, **k: ({}, 0))
    monkeypatch.setattr(bench, "forward_case", lambda *a, **k: {})
    monkeypatch.setattr(bench, "_ratio_rows", lambda *a, **k: [])
    monkeypatch.setattr(bench, "serving_rows", lambda *a, **k: [])
    monkeypatch.setattr(bench_lossless, "timing_rows", lambda *a, **k: [])
    bench.run("cpu", quick=True, dim=dim)
    assert seen and set(seen) == widths, seen


def test_the_gpu_profile_rehearsal_profiles_every_case(capsys):
    """bench/gpu_profile.py (gpu_check.sh's last step), rehearsed: every case profiled and timed, each a line of
    the summary; the simulator stands in for _C (the kernels' branch, not the reference)."""
    import importlib.util
    import pathlib
    sim = pytest.importorskip("lora_ext._sim")
    path = pathlib.Path(__file__).resolve().parent.parent / "bench" / "gpu_profile.py"
    spec = importlib.util.spec_from_file_location("gpu_profile", path)
    gp = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gp)
    with bench.rehearsing():
        names = list(gp.cases(16, 4, torch.bfloat16, "cpu"))
    assert "unmerged forward M=1, CUDA graph replay" in names
    gp.main(["--rehearse", "--dim", "32"])
    out = capsys.readouterr().out
    assert out.rstrip().endswith("gpu_profile: done")
    summary = out.split("## summary (us per call)")[1].splitlines()[1:-1]
    assert [line.strip().split("  ", 1)[1] for line in summary] == names
    assert all(float(line.split()[0]) > 0 for line in summary)
    assert out.count("top Python functions by own time") == len(names)
    assert sim.last_variant().startswith("merge<")  # the last case, ops.merge_, went through the kernels' branch
