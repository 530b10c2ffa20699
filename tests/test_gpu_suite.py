"""bench.gpu_suite: the budgeted GPU command. Its --quick dry run on CPU, and the budget/cap/pack mechanics."""
import json
import os
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

from bench import gpu_suite, harness
from bench.gpu_suite import Step, run_suite


def _py(code: str) -> list:
    return ["-c", code]


def test_results_log_appends_at_once_and_updates_in_place(tmp_path):
    (tmp_path / "x.jsonl").write_text('{"run_id": "other", "v": 0}\n', encoding="utf-8")
    log = harness.ResultsLog("x", tmp_path)
    a = log.add({"impl": "a", "ms_median": 1.0})
    lines = (tmp_path / "x.jsonl").read_text().splitlines()
    assert len(lines) == 2 and json.loads(lines[1])["impl"] == "a"  # on disk before the run ends
    b = log.add({"impl": "b", "ms_median": 2.0})
    with open(tmp_path / "x.jsonl", "a") as f:  # another run writing in between
        f.write('{"run_id": "late", "v": 1}\n')
    a["ratio"], b["ratio"] = 2.0, 0.5
    log.update()
    recs = [json.loads(x) for x in (tmp_path / "x.jsonl").read_text().splitlines()]
    assert [r.get("impl") for r in recs] == [None, "a", "b", None]
    assert [r.get("ratio") for r in recs] == [None, 2.0, 0.5, None]
    assert recs[1]["seq"] == 0 and recs[2]["seq"] == 1 and recs[1]["run_id"] == log.run_id


def test_plot_vs_says_when_a_metric_was_not_measured(tmp_path):
    import warnings
    recs = [{"N": n, "series": s, "ms_median": n * k, "peak_mem_mib": None}  # no CUDA memory on CPU
            for n in (64, 128) for s, k in (("a", 1.0), ("b", 2.0))]
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an empty legend warns
        png = harness.plot_vs(recs, "N", ["ms_median", "peak_mem_mib"], "series", tmp_path / "p.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_profile_fn_names_the_op_that_takes_the_time():
    import torch

    a = torch.randn(384, 384)
    calls = []

    def fn():
        calls.append(1)
        return (a @ a).add_(1.0)  # one big mm, one small elementwise op

    prof = harness.profile_fn(fn, "cpu", rep=3, top=4)
    assert len(calls) == 1 + 3 + 3 + 3 + 3  # warm-up, timed, torch.profiler, cProfile, host-wait count
    assert prof["activity"] == "cpu" and prof["rep"] == 3 and prof["bound"] is None and prof["busy"] is None
    assert prof["top"][0]["name"] == "aten::mm" and prof["top"][0]["calls"] == 1  # per call, not per rep
    assert prof["top"][0]["share"] > 0.5 and sum(t["share"] for t in prof["top"]) <= 1 + 1e-9
    assert prof["device_ms"] >= prof["top"][0]["ms"] > 0 and prof["wall_ms"] > 0 and prof["host_ms"] > 0
    assert "aten::mm" in harness.format_profile(prof)
    # host side: the Python functions by self time, the profiler's own frame left out
    names = [t["name"] for t in prof["host_top"]]
    assert len(names) <= 4 and not any("_lsprof" in n for n in names)
    assert any(n.endswith("(fn)") and "test_gpu_suite.py" in n for n in names)
    assert all(t["calls"] > 0 and t["ms"] >= 0 for t in prof["host_top"])
    assert 0 < sum(t["share"] for t in prof["host_top"]) <= 1 + 1e-9
    assert "host, Python self time per call" in harness.format_profile(prof)
    assert prof["syncs"]["per_call"] == 0 and "host waits for the device: 0 per call" in harness.format_profile(prof)


def _reads_twice(t):
    if bool(t.sum() > -1e30):  # one host read here ...
        return float(t.max())  # ... and one here
    return None


def test_count_host_syncs_counts_host_reads_by_line_and_restores_tensor():
    import torch

    t = torch.randn(16)
    before = {n: (n in vars(torch.Tensor), getattr(torch.Tensor, n)) for n in harness._HOST_READS}
    got = harness.count_host_syncs(lambda: _reads_twice(t), "cpu", rep=3)
    assert got["per_call"] == 2 and got["method"].startswith("host reads")
    lines = {s["where"] for s in got["sites"]}
    assert all(w.startswith("tests/test_gpu_suite.py:") and w.endswith("(_reads_twice)") for w in lines)
    assert len(lines) == 2 and all(s["per_call"] == 1 for s in got["sites"])
    assert harness.count_host_syncs(lambda: t.add(1), "cpu", rep=2) == {
        "method": "host reads of tensor values + DeepSpeed accelerator waits (CPU)", "per_call": 0, "sites": []}
    with pytest.raises(RuntimeError, match="boom"):  # the counting hooks come off on an error too
        harness.count_host_syncs(lambda: (_ for _ in ()).throw(RuntimeError("boom")), "cpu", rep=1)
    assert {n: (n in vars(torch.Tensor), getattr(torch.Tensor, n)) for n in harness._HOST_READS} == before
    assert float(t.sum()) == float(t.sum())  # and reading still works


def test_count_host_syncs_counts_deepspeed_accelerator_waits():
    from deepspeed.accelerator import get_accelerator

    accel = get_accelerator()
    had_own = "synchronize" in vars(accel)
    got = harness.count_host_syncs(lambda: get_accelerator().synchronize(), "cpu", rep=2)
    assert got["per_call"] == 1 and got["sites"][0]["where"].endswith("(<lambda>)")
    assert ("synchronize" in vars(accel)) == had_own  # unpatched afterwards


@pytest.mark.cuda
def test_gpu_count_host_syncs_sees_item_and_not_async_work():
    import torch

    t = torch.randn(1024, device="cuda")
    got = harness.count_host_syncs(lambda: _reads_twice(t), "cuda", rep=2)
    assert got["method"] == "explicit waits + cuda sync debug mode" and got["per_call"] >= 2
    assert any("test_gpu_suite.py" in s["where"] for s in got["sites"])
    assert harness.count_host_syncs(lambda: t.mul(2).sum(), "cuda", rep=2)["per_call"] == 0
    explicit = harness.count_host_syncs(lambda: torch.cuda.synchronize(), "cuda", rep=2)
    assert explicit["per_call"] == 1 and explicit["sites"][0]["where"].endswith("(<lambda>)")  # once, not twice
    assert torch.cuda.get_sync_debug_mode() == 0  # left as it was


def test_short_frame_names_the_package_path():
    assert harness._short_frame("/x/lib/python3.12/site-packages/triton/runtime/jit.py", 600, "run") == \
        "triton/runtime/jit.py:600(run)"
    repo = Path(harness.__file__).resolve().parent.parent
    assert harness._short_frame(str(repo / "kclip" / "kernels" / "projected_mse_loss.py"), 12, "f") == \
        "kclip/kernels/projected_mse_loss.py:12(f)"
    assert harness._short_frame("/elsewhere/a/b/c.py", 3, "g") == "a/b/c.py:3(g)"
    assert harness._short_frame("/x/site-packages/deepspeed/runtime/utils.py", 233) == "deepspeed/runtime/utils.py:233"
    assert harness._short_frame("~", 0, "<method 'mm' of 'torch._C.TensorBase' objects>") == \
        "<method 'mm' of 'torch._C.TensorBase' objects>"


def test_profile_rows_keep_the_newest_record_per_shape_and_impl(tmp_path):
    def rec(impl, B, device_ms, busy):
        prof = {"activity": "cuda", "rep": 3, "wall_ms": 2.0, "host_ms": 1.5, "device_ms": device_ms, "busy": busy,
                "bound": "device" if busy >= 0.8 else "host",
                "top": [{"name": "gemm_kernel", "calls": 1, "ms": device_ms / 2, "share": 0.5}],
                "host_top": [{"name": "triton/runtime/jit.py:600(run)", "calls": 1, "ms": 0.1, "share": 0.25}],
                "syncs": {"method": "explicit waits + cuda sync debug mode", "per_call": 3,
                          "sites": [{"where": "deepspeed/runtime/utils.py:233", "per_call": 2}]}}
        return json.dumps({"impl": impl, "B": B, "d": 512, "d_out": 4096, "profile": prof})

    (tmp_path / "projected_mse_loss.jsonl").write_text("\n".join([
        rec("kernel", 4096, 1.0, 0.5), json.dumps({"impl": "kernel", "B": 4096, "ms_median": 1.0}),
        rec("kernel", 4096, 1.8, 0.9), rec("eager", 4096, 0.4, 0.2)]) + "\n", encoding="utf-8")
    rows = gpu_suite.profile_rows(tmp_path)
    assert [(r["impl"], r["device_ms"], r["bound"]) for r in rows] == [("kernel", 1.8, "device"), ("eager", 0.4, "host")]
    assert rows[0]["where"] == "B=4096, d=512, d_out=4096" and rows[0]["top"] == "gemm_kernel (50%)"
    text = gpu_suite.render_summary({"quick": False, "git": "r", "budget_s": 1, "seconds": 1, "steps": []}, [], rows)
    assert ("| projected_mse_loss | B=4096, d=512, d_out=4096 | kernel | 2.000 | 1.800 | 1.500 | 90% | device | "
            "gemm_kernel (50%) | triton/runtime/jit.py:600(run) (25%) | "
            "3 (deepspeed/runtime/utils.py:233 x2) |") in text


def test_git_revision_falls_back_to_the_environment(monkeypatch, tmp_path):
    monkeypatch.setattr(harness, "__file__", str(tmp_path / "harness.py"))  # a tree without .git
    monkeypatch.setenv("GIT_CEILING_DIRECTORIES", str(tmp_path.parent))
    monkeypatch.setenv(harness.GIT_REV_ENV, "abc1234")
    assert harness.git_revision() == "abc1234"
    monkeypatch.delenv(harness.GIT_REV_ENV)
    assert harness.git_revision() == "unknown"


def test_cap_kills_the_whole_group_and_keeps_what_was_measured(tmp_path):
    marker = tmp_path / "grandchild_alive"
    # the step writes one measurement, starts a grandchild that would touch a file later, then hangs
    grandchild = f"import time; time.sleep(4); open({str(marker)!r}, 'w')"
    code = (
        "import json, subprocess, sys, time, os\n"
        f"open(os.path.join({str(tmp_path)!r}, 'out', 'results', 'fake.jsonl'), 'a').write(json.dumps({{'v': 1}}) + '\\n')\n"
        f"subprocess.Popen([sys.executable, '-c', {grandchild!r}])\n"
        "print('measured one', flush=True)\n"
        "time.sleep(60)\n")
    steps = [Step("hangs", "writes then hangs", _py(code), _py(code), est_s=1, min_s=0, cap_s=2, results=False),
             Step("after", "runs after the killed step", _py("print('second step ran')"), _py("print('x')"),
                  est_s=1, min_s=0, cap_s=20, results=False)]
    t0 = time.monotonic()
    suite = run_suite(steps, budget_s=60, out=tmp_path / "out", pack_dir=tmp_path / "pack")
    assert time.monotonic() - t0 < 30
    status = {s["name"]: s["status"] for s in suite["steps"]}
    assert status == {"hangs": "timeout", "after": "ok"}
    assert (tmp_path / "out" / "results" / "fake.jsonl").read_text().strip() == '{"v": 1}'
    log = (tmp_path / "out" / "logs" / "hangs.log").read_text()
    assert "measured one" in log
    time.sleep(5)
    assert not marker.exists(), "the step's grandchild outlived the cap"
    with tarfile.open(tmp_path / "pack" / gpu_suite.PACK_NAME) as tar:
        names = tar.getnames()
    assert "results/fake.jsonl" in names and "summary.md" in names
    assert (tmp_path / "pack" / "summary.md").exists()


def test_steps_that_no_longer_fit_are_skipped_and_recorded(tmp_path):
    sleep = _py("import time; time.sleep(1.5)")
    steps = [Step("first", "sleeps", sleep, sleep, est_s=1, min_s=0, cap_s=10, results=False),
             Step("big", "needs more than is left", sleep, sleep, est_s=100, min_s=100, cap_s=200, results=False),
             Step("small", "still fits", _py("pass"), _py("pass"), est_s=1, min_s=1, cap_s=5, results=False)]
    suite = run_suite(steps, budget_s=gpu_suite.RESERVE_S + 20, out=tmp_path / "out")
    by = {s["name"]: s for s in suite["steps"]}
    assert by["first"]["status"] == "ok" and by["small"]["status"] == "ok"
    assert by["big"]["status"] == "skipped" and "needs at least 100 s" in by["big"]["reason"]
    assert suite["seconds"] < gpu_suite.RESERVE_S + 20
    summary = (tmp_path / "out" / "summary.md").read_text()
    assert "| big | skipped |" in summary
    # a failing step is recorded as failed and the suite goes on
    suite = run_suite([Step("bad", "exits 3", _py("raise SystemExit(3)"), _py("x"), 1, 0, 5, results=False)],
                      budget_s=60, out=tmp_path / "out2")
    assert suite["steps"][0]["status"] == "failed" and suite["steps"][0]["returncode"] == 3


def test_preflight_stops_before_any_step_when_kclip_is_not_importable(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_suite, "PREFLIGHT", "import kclip.no_such_module")
    ran = tmp_path / "ran"
    step = Step("would_run", "touches a file", _py(f"open({str(ran)!r}, 'w')"), _py("x"), 1, 0, 5, results=False)
    suite = run_suite([step], budget_s=60, out=tmp_path / "out")
    assert suite["steps"] == [] and not ran.exists()
    assert "no_such_module" in suite["preflight"] and "pip install" in suite["preflight"]
    assert "Preflight failed" in (tmp_path / "out" / "summary.md").read_text()


def test_list_and_only(capsys):
    assert gpu_suite.main(["--list"]) == 0
    out = capsys.readouterr().out
    for step in gpu_suite.plan():
        assert step.name in out
    with pytest.raises(SystemExit):
        gpu_suite.main(["--only", "no_such_step", "--list"])
    # --only runs in the order given (each step once), so a session puts what is still unmeasured first
    assert gpu_suite.main(["--only", "contrastive_tune", "env", "contrastive_tune", "--list"]) == 0
    rows = [line.split()[1] for line in capsys.readouterr().out.splitlines() if line[:2].strip().isdigit()]
    assert rows == ["contrastive_tune", "env"], rows


def test_target_rows_pass_and_fail(tmp_path):
    """Hand-made records: each ratio and its verdict computed as the issue states the targets."""
    res = tmp_path / "results"
    res.mkdir()
    rows = lambda name, recs: (res / f"{name}.jsonl").write_text(  # noqa: E731
        "".join(json.dumps(r) + "\n" for r in recs))
    rows("env", [{"impl": "env", "matmul_tflops": 800.0}])
    rows("clip_contrastive_loss", [
        {"impl": "kclip", "N": 16384, "D": 768, "ms_median": 10.0, "tflops": 100.0, "peak_mem_bytes": 16384 * 8192},
        {"impl": "eager", "N": 16384, "D": 768, "ms_median": 30.0},
        {"impl": "inf_cl", "N": 16384, "D": 768, "ms_median": 20.0},
        {"impl": "kclip", "N": 32768, "D": 768, "ms_median": 30.0, "tflops": 480.0, "peak_mem_bytes": 32768 * 10240},
        {"impl": "inf_cl", "N": 32768, "D": 768, "ms_median": 120.0}])
    rows("projected_mse_loss", [{"impl": i, "B": 4096, "d": 512, "d_out": 4096, "ms_median": ms}
                                for i, ms in (("kernel", 1.0), ("eager", 1.6), ("compile", 1.1), ("floor", 0.7))])
    t = {r["target"] + "|" + r["where"]: r for r in gpu_suite.target_rows(res)}
    mem = t["contrastive memory per sample|D=768, N=32768"]
    assert mem["measured"] == pytest.approx(10.0) and mem["status"] == "PASS"
    assert t["contrastive vs eager (open_clip ClipLoss)|D=768, N=16384"]["measured"] == pytest.approx(3.0)
    inf = t["contrastive vs Inf-CL (worst N)|D=768, N=16384"]
    assert inf["measured"] == pytest.approx(2.0) and inf["status"] == "FAIL"
    share = t["contrastive share of bf16 matmul ceiling (4-matmul floor FLOPs)|D=768, N=32768"]
    assert share["measured"] == pytest.approx(0.6) and share["status"] == "PASS"
    assert t["projected-MSE vs eager|B=4096, d=512, d'=4096"]["status"] == "PASS"
    assert t["projected-MSE vs torch.compile|B=4096, d=512, d'=4096"]["status"] == "FAIL"
    floor = t["projected-MSE over the 3-GEMM floor|B=4096, d=512, d'=4096"]
    assert floor["measured"] == pytest.approx(1 / 0.7) and floor["status"] == "FAIL"
    assert t["k-means ms per steady-state Lloyd iteration|500000 x 4096, K=1000"]["status"] == "n/a"
    assert t["k-means ms per Lloyd iteration (fit / iterations)|500000 x 4096, K=1000"]["status"] == "n/a"


def test_quick_dry_run_runs_every_step(tmp_path):
    """The CI dry run: every step of the plan at --quick sizes on CPU, in one subprocess as a user runs it."""
    import torch.distributed as dist

    out, pack = tmp_path / "out", tmp_path / "pack"
    # a caller's stale launcher variables (as a process that called kclip.distributed.setup leaves them), the
    # port held by this process's store: the steps must make their own process groups regardless
    store = dist.TCPStore("127.0.0.1", 0, 1, is_master=True, wait_for_workers=False)
    env = dict(os.environ, KCLIP_GIT_REV="test-rev", RANK="0", WORLD_SIZE="1", LOCAL_RANK="0",
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(store.port))
    proc = subprocess.run([sys.executable, "-m", "bench.gpu_suite", "--quick", "--out", str(out), "--pack", str(pack)],
                          cwd=gpu_suite.REPO_ROOT, env=env, capture_output=True, text=True, timeout=900)
    failed = [s["name"] for s in json.loads((out / "suite.json").read_text())["steps"] if s["status"] != "ok"] \
        if (out / "suite.json").exists() else []
    failed_logs = "".join(f"\n--- {name}.log\n" + (out / "logs" / f"{name}.log").read_text()[-3000:]
                          for name in failed if (out / "logs" / f"{name}.log").exists())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-1000:] + failed_logs[-6000:]
    suite = json.loads((out / "suite.json").read_text())
    assert [s["name"] for s in suite["steps"]] == [s.name for s in gpu_suite.plan()]
    assert all(s["status"] == "ok" for s in suite["steps"]), suite["steps"]
    for bench in ("env", "clip_contrastive_loss", "projected_mse_loss", "train_step", "kmeans", "teacher", "loader"):
        recs = [json.loads(x) for x in (out / "results" / f"{bench}.jsonl").read_text().splitlines()]
        assert recs and all(r.get("run_id") for r in recs), bench
    summary = (pack / "summary.md").read_text()
    assert "DRY RUN" in summary and "| train step vs open_clip-style step |" in summary
    profiled = {row["bench"] for row in gpu_suite.profile_rows(out / "results")}
    assert profiled == {"projected_mse_loss", "clip_contrastive_loss", "train_step", "kmeans"}, profiled
    assert "Where the time goes" in summary
    # the --tune sweep's table: the default and one variant of each kernel, both checked against the default
    assert "Contrastive launch configurations" in summary
    assert "| 48 | 32 | fused | grad | " in summary and "PREFETCH=True" in summary, summary
    assert "| 48 | 32 | chunked | chunk | " in summary and "rows=7" in summary, summary
    measured = [r for r in suite["targets"] if r["measured"] is not None]
    assert len(measured) >= 8, suite["targets"]  # the dry run exercises the evaluation, not only the steps
    with tarfile.open(pack / gpu_suite.PACK_NAME) as tar:
        assert "results/train_step.jsonl" in tar.getnames()
