"""tools/gpu_check.py: budgets, per-step limits, process-group kills, the incremental summary, --dry-run.

The control-flow tests drive the Runner with tiny budgets and sleeping stand-ins (no torch in the
subprocesses); one test runs the real --dry-run end to end and files its output with --unpack.
"""

import csv
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tools import gpu_check

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "tools" / "gpu_check.py"

Stage, Step = gpu_check.Stage, gpu_check.Step


def py(code: str) -> list:
    return [sys.executable, "-c", code]


# A step that starts a grandchild, records its pid, ignores SIGINT (as does the grandchild: SIG_IGN survives
# exec), and would sleep for a minute: only SIGKILL to the whole process group ends it at its limit.
STUBBORN = ("import signal, subprocess, sys, time; signal.signal(signal.SIGINT, signal.SIG_IGN); "
            "child = subprocess.Popen(['sleep', '60']); open(sys.argv[1], 'w').write(str(child.pid)); "
            "print('started', flush=True); time.sleep(60)")


def runner(tmp_path, stages, budget, grace=0.3):
    ctx = gpu_check.Context(dry_run=True, python=sys.executable, work=tmp_path / "work")
    return gpu_check.Runner(stages, ctx, tmp_path / "out", budget, grace=grace, echo=False)


def summary(tmp_path) -> dict:
    return json.loads((tmp_path / "out" / "summary.json").read_text())


def stages_by_name(data: dict) -> dict:
    return {record["name"]: record for record in data["stages"]}


def is_gone(pid: int, wait_s: float = 3.0) -> bool:
    """The process has exited (no such pid, or a zombie nobody reaped yet)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        try:
            state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except (FileNotFoundError, ProcessLookupError):
            return True
        if state in ("Z", "X"):
            return True
        time.sleep(0.05)
    return False


def wait_for(predicate, wait_s: float = 10.0) -> bool:
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False


def test_step_over_its_limit_is_killed_with_its_group_and_later_stages_run(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    stages = [Stage("slow", 1, 0.1, [Step("stubborn", py(STUBBORN) + [str(pid_file)], min_s=0.1)]),
              Stage("after", 1, 0.1, [Step("quick", py("print('after ran')"), min_s=0.1)])]
    start = time.monotonic()
    status = runner(tmp_path, stages, budget=3.0).run()
    elapsed = time.monotonic() - start
    data = summary(tmp_path)
    slow, after = stages_by_name(data)["slow"], stages_by_name(data)["after"]
    assert slow["state"] == "timeout" and slow["steps"][0]["state"] == "timeout"
    assert slow["steps"][0]["returncode"] == -signal.SIGKILL  # SIGINT was ignored, SIGKILL ended it
    assert 1.2 <= slow["seconds"] <= 2.2, slow  # its limit: half of the 3 s budget
    assert is_gone(int(pid_file.read_text())), "the grandchild outlived its process group's kill"
    assert after["state"] == "ok" and "after ran" in (tmp_path / "out" / "after.log").read_text()
    assert status == 1 and data["state"] == "done" and data["exit_status"] == 1
    assert elapsed < 3.5


def test_failing_stage_is_recorded_and_the_run_goes_on(tmp_path):
    stages = [Stage("broken", 1, 0.1, [Step("exit3", py("import sys; print('boom'); sys.exit(3)"), min_s=0.1),
                                       Step("next", py("print('same stage, next step')"), min_s=0.1)]),
              Stage("later", 1, 0.1, [Step("quick", py("pass"), min_s=0.1)])]
    assert runner(tmp_path, stages, budget=20.0).run() == 1
    data = stages_by_name(summary(tmp_path))
    assert data["broken"]["state"] == "failed"
    assert [(s["state"], s["returncode"]) for s in data["broken"]["steps"]] == [("failed", 3), ("ok", 0)]
    assert "boom" in data["broken"]["tail"] and "boom" in (tmp_path / "out" / "broken.log").read_text()
    assert data["later"]["state"] == "ok"


def test_exhausted_budget_skips_the_stages_that_cannot_start(tmp_path):
    stages = [Stage("first", 1, 0.1, [Step("sleep", py("import time; time.sleep(30)"), min_s=0.1)]),
              Stage("second", 1, 2.5, [Step("never", py("pass"))]),
              Stage("third", 1, 2.5, [Step("never", py("pass"))])]
    start = time.monotonic()
    assert runner(tmp_path, stages, budget=3.0, grace=0.2).run() == 1
    assert time.monotonic() - start < 3.5
    data = stages_by_name(summary(tmp_path))
    assert data["first"]["state"] == "timeout" and data["first"]["seconds"] < 1.5  # its 1 s share
    for name in ("second", "third"):  # 2 s left, under their 2.5 s minimum
        assert data[name]["state"] == "skipped" and data[name]["reason"].startswith("budget"), data[name]
        assert data[name]["steps"] == []


def test_unused_time_passes_to_later_stages_and_steps_keep_their_reserve(tmp_path):
    stages = [Stage("fast", 1, 0.1, [Step("quick", py("pass"), min_s=0.1)]),
              Stage("split", 1, 0.1, [Step("hog", py("import time; time.sleep(30)"), min_s=0.1),
                                      Step("reserved", py("print('kept its share')"), reserve=0.5, min_s=0.1)])]
    runner(tmp_path, stages, budget=4.0, grace=0.2).run()
    data = stages_by_name(summary(tmp_path))
    assert data["split"]["limit_s"] > 3.0  # its 2 s share plus most of what "fast" left
    hog, reserved = data["split"]["steps"]
    assert hog["state"] == "timeout" and hog["limit_s"] <= 0.5 * data["split"]["limit_s"] + 0.1
    assert reserved["state"] == "ok"


def test_summary_is_current_while_a_stage_runs(tmp_path):
    out = tmp_path / "out"
    peek = ("import json, sys; s = json.load(open(sys.argv[1])); "
            "print('seen:', s['state'], s['stages'][0]['state'], s['stages'][0]['steps'][0]['state'], "
            "s['stages'][1]['state'])")
    stages = [Stage("look", 1, 0.1, [Step("peek", py(peek) + [str(out / "summary.json")], min_s=0.1)]),
              Stage("waiting", 1, 0.1, [Step("quick", py("pass"), min_s=0.1)])]
    runner(tmp_path, stages, budget=20.0).run()
    assert "seen: running running running pending" in (out / "look.log").read_text()


def test_a_stage_gets_its_minimum_before_later_shares(tmp_path):
    stages = [Stage("needs_two", 1, 2.0, [Step("sleep", py("import time; time.sleep(30)"), min_s=0.1)]),
              Stage("rest", 3, 0.1, [Step("quick", py("pass"), min_s=0.1)])]
    assert runner(tmp_path, stages, budget=4.0, grace=0.2).run() == 1  # the sleeper times out
    data = stages_by_name(summary(tmp_path))
    assert data["needs_two"]["limit_s"] == 2.0 and data["needs_two"]["state"] == "timeout"  # share alone: 1 s
    assert data["rest"]["state"] == "ok"


def test_a_stage_whose_requirement_failed_is_skipped(tmp_path):
    stages = [Stage("base", 1, 0.1, [Step("fail", py("raise SystemExit(1)"), min_s=0.1)]),
              Stage("dependent", 1, 0.1, [Step("never", py("pass"))], requires=("base",)),
              Stage("mixed", 1, 0.1, [Step("needs_base", py("pass"), requires=("base",)),
                                      Step("free", py("pass"), min_s=0.1)]),
              Stage("missing_tool", 1, 0.1, [Step("absent", missing="no such tool")]),
              Stage("on_gpu", 1, 0.1, [Step("never", py("pass"))], requires=("gpu",)),  # the env found none
              Stage("after_earlier_call", 1, 0.1, [Step("quick", py("pass"), min_s=0.1)], requires=("build",))]
    runner(tmp_path, stages, budget=20.0).run()
    data = stages_by_name(summary(tmp_path))
    assert data["dependent"]["state"] == "skipped" and data["dependent"]["reason"] == "needs base (failed)"
    assert [(s["state"], s.get("reason")) for s in data["mixed"]["steps"]] == [("skipped", "needs base (failed)"),
                                                                               ("ok", None)]
    assert data["mixed"]["state"] == "partial"
    assert data["missing_tool"]["state"] == "missing"
    assert data["missing_tool"]["steps"][0]["reason"] == "no such tool"
    assert data["on_gpu"]["state"] == "skipped" and data["on_gpu"]["reason"].startswith("needs a CUDA device")
    assert data["after_earlier_call"]["state"] == "ok"  # no build stage in this run: an earlier call built


def test_interrupted_driver_kills_the_step_and_writes_the_summary(tmp_path):
    pid_file = tmp_path / "grandchild.pid"
    program = (
        "import sys; from tools import gpu_check as g\n"
        f"stages = [g.Stage('long', 1, 0.1, [g.Step('stubborn', {py(STUBBORN) + [str(pid_file)]!r})]),\n"
        "          g.Stage('never', 1, 0.1, [g.Step('quick', [sys.executable, '-c', 'pass'])])]\n"
        f"ctx = g.Context(dry_run=True, python=sys.executable, work=g.Path({str(tmp_path / 'work')!r}))\n"
        f"sys.exit(g.Runner(stages, ctx, g.Path({str(tmp_path / 'out')!r}), 60.0, grace=0.3).run())\n")
    driver = subprocess.Popen([sys.executable, "-c", program], cwd=ROOT, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT)
    try:
        assert wait_for(lambda: pid_file.exists() and pid_file.read_text()), "the step never started"
        driver.send_signal(signal.SIGTERM)
        driver.wait(timeout=10)
    finally:
        driver.kill()
    assert driver.returncode == 128 + signal.SIGTERM, driver.stdout.read().decode()
    data = summary(tmp_path)
    assert data["state"] == "interrupted" and data["interrupted_by"] == "SIGTERM"
    records = stages_by_name(data)
    assert records["long"]["state"] == "interrupted" and records["long"]["steps"][0]["state"] == "interrupted"
    assert records["never"]["state"] == "skipped" and records["never"]["reason"] == "driver got SIGTERM"
    assert "started" in records["long"]["tail"]
    assert is_gone(int(pid_file.read_text()))


def test_stage_state_words():
    assert gpu_check.stage_state(["ok", "skipped"]) == "partial"
    assert gpu_check.stage_state(["ok", "timeout", "skipped"]) == "timeout"
    assert gpu_check.stage_state(["failed", "ok"]) == "failed"
    assert gpu_check.stage_state(["missing"]) == "missing"
    assert gpu_check.stage_state(["ok", "ok"]) == "ok"


def test_keyword_selections_split_the_gpu_tests_by_backend(tmp_path):
    """The device run's three -k expressions: each GPU test in exactly one, whichever file holds it."""
    (tmp_path / "test_projection.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('device,backend', [('cpu', 'cpu'), ('cuda', 'cuda'), ('cuda', 'triton')])\n"
        "def test_float64_matches(device, backend): pass\n"
        "def test_plain_cpu(): pass\n")
    (tmp_path / "test_torch_library.py").write_text(
        "import pytest\n"
        "def test_torch_compile_fullgraph(): pass\n"
        "def test_opcheck(): pass\n"
        "def test_opcheck_cuda(): pass\n"
        "@pytest.mark.cuda\n"
        "def test_half_paths(): pass\n")
    (tmp_path / "test_triton_backend.py").write_text("def test_opcheck(): pass\n")
    (tmp_path / "test_kernels_sync.py").write_text(
        "import pytest\n"
        "@pytest.mark.parametrize('backend', ['cuda', 'triton'])\n"
        "def test_has_no_host_sync(backend): pass\n")

    def selected(expression):
        result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider",
                                 "-W", "ignore", "-k", expression], cwd=tmp_path, capture_output=True, text=True)
        return {line.split("::", 1)[1] for line in result.stdout.splitlines() if "::" in line}

    groups = [selected(e) for e in (gpu_check.CUDA_TESTS, gpu_check.TRITON_TESTS, gpu_check.SYNC_TESTS)]
    assert groups[0] == {"test_float64_matches[cuda-cuda]", "test_opcheck_cuda", "test_half_paths"}
    assert groups[1] == {"test_float64_matches[cuda-triton]", "test_opcheck"}  # the second by its file name
    assert groups[2] == {"test_has_no_host_sync[cuda]", "test_has_no_host_sync[triton]"}


def test_setup_arch_list_restricts_the_nvcc_targets(monkeypatch):
    spec = importlib.util.spec_from_file_location("svp_setup", ROOT / "setup.py")
    setup_module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(setup_module)  # defines the helpers; setup() runs only as __main__
    from torch.utils import cpp_extension

    monkeypatch.delenv("TORCH_CUDA_ARCH_LIST", raising=False)
    assert setup_module.nvcc_arch_flags() == ["-gencode", "arch=compute_80,code=sm_80",
                                              "-gencode", "arch=compute_90,code=sm_90"]
    monkeypatch.setenv("TORCH_CUDA_ARCH_LIST", "9.0")
    own = setup_module.nvcc_arch_flags()
    assert own == [] and cpp_extension._get_cuda_arch_flags(["-O3", *own]) == ["-gencode=arch=compute_90,code=sm_90"]


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    base = tmp_path_factory.mktemp("dry_run")
    result = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(base / "out"),
                             "--work", str(base / "work"), "--label", "ci", "--budget", "1200"],
                            cwd=ROOT, capture_output=True, text=True, timeout=400)
    return base, result


def test_dry_run_writes_a_summary_with_every_stage(dry_run):
    """(A budget of 1200 s: the shares of 480 s are tight for CPU stand-ins on a shared machine.)"""
    base, result = dry_run
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    data = json.loads((base / "out" / "summary.json").read_text())
    assert data["schema"] == gpu_check.SCHEMA and data["mode"] == "dry-run" and data["state"] == "done"
    assert data["label"] == "ci" and data["exit_status"] == 0 and data["elapsed_s"] <= data["budget_s"]
    assert [r["name"] for r in data["stages"]] == list(gpu_check.STAGE_NAMES)
    for record in data["stages"]:
        assert record["state"] in ("ok", "missing"), record
        assert (base / "out" / record["log"]).exists()
        assert record["limit_s"] > 0 and record["seconds"] <= record["limit_s"] + 1
    assert len(list((base / "out").iterdir())) <= 8  # what a device call brings back
    assert data["env"]["python"] and data["env"]["torch"] and data["env"]["cuda_available"] is False
    tests = stages_by_name(data)["tests"]
    assert [s["name"] for s in tests["steps"]] == ["cuda", "triton", "host_sync"]
    assert all(s["counts"].get("passed", 0) >= 1 for s in tests["steps"])
    train_step = stages_by_name(data)["train_step"]
    assert train_step["state"] == ("ok" if (ROOT / "bench" / "train_step.py").exists() else "missing")
    rows = list(csv.DictReader(data["artifacts"]["bench.csv"]["text"].splitlines()))
    assert any(r["variant"] == "cpu" and float(r["median_ms"]) > 0 for r in rows)
    assert json.loads(data["artifacts"]["memory_depth_cpu.json"]["text"])


def test_unpack_files_the_dry_run_output(dry_run, tmp_path):
    base, _ = dry_run
    written = gpu_check.unpack(base / "out", tmp_path)
    results = tmp_path / "bench" / "results"
    assert (results / "cpu.csv").read_text().startswith("op,B,D,C,p,dtype,projection,variant")
    assert (results / "memory_depth_cpu.json").exists()
    kept = [p for p in written if p.name == "summary.json"]
    assert kept and len(list(kept[0].parent.glob("*.log"))) == len(gpu_check.STAGE_NAMES)
    gpu_check.unpack(base / "out", tmp_path)  # a second run appends its rows under the one header
    lines = (results / "cpu.csv").read_text().splitlines()
    assert sum(line.startswith("op,B,D,C,p,dtype,projection,variant") for line in lines) == 1 and len(lines) > 2
    assert os.path.getsize(results / "cpu.csv") > 0


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_device_plan_targets_the_device_arch_and_speaks_the_runners_flags(tmp_path, monkeypatch):
    """The device-mode steps, planned from a 16-core sm_90 env, as the programs they call parse them."""
    monkeypatch.syspath_prepend(str(ROOT / "bench"))  # as `python bench/local_loss.py` finds bench/baselines.py
    ctx = gpu_check.Context(dry_run=False, python=sys.executable, work=tmp_path,
                            env={"arch": "9.0", "cpu_count": 16, "modules": {"pytest_timeout": True}})
    plan = {stage.name: stage for stage in gpu_check.stage_plan(dry_run=False)}
    assert tuple(plan) == gpu_check.STAGE_NAMES and sum(s.share for s in plan.values()) == gpu_check.DEFAULT_BUDGET_S
    assert plan["env"].requires == () and plan["sanitize"].requires == ("gpu", "build")
    assert all(plan[name].requires == ("gpu",) for name in gpu_check.STAGE_NAMES if name not in ("env", "sanitize"))
    steps = {name: stage.steps(ctx, stage) for name, stage in plan.items()}

    build = steps["build"][0]
    assert build.argv[1:] == ["setup.py", "build_ext", "--inplace"]
    assert build.env == {"MAX_JOBS": "16", "SVP_KERNELS_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": "9.0"}

    selections = [step.argv[step.argv.index("-k") + 1] for step in steps["tests"]]
    assert selections == [gpu_check.CUDA_TESTS, gpu_check.TRITON_TESTS, gpu_check.SYNC_TESTS]
    assert all("--maxfail=30" in step.argv and "--timeout" in step.argv for step in steps["tests"])
    assert [step.requires for step in steps["tests"]] == [("build",), (), ()]

    run_py = load_module("bench_run_for_plan", ROOT / "bench" / "local_loss.py")
    parsed = [(step.name, run_py.parse_args(step.argv[2:])) for step in steps["bench"]]
    shapes = {(name.split("-")[0], args.shapes) for name, args in parsed}
    expected = {",".join(map(str, shape)) for shape in run_py.GPU_SHAPES}
    assert shapes == {(kind, shape) for kind in ("kernels", "compile") for shape in expected}
    for name, args in parsed:
        assert args.device == "cuda" and args.dtype == "float32,bfloat16" and args.projection == "dense,implicit"
        assert args.variants.split(",") == (["compile"] if name.startswith("compile") else
                                            ["cuda", "triton",
                                             gpu_check.eager_baseline(ROOT / "bench" / "local_loss.py")])

    from svp_kernels.train import cli

    (sweep,) = steps["memory_depth"]
    assert sweep.argv[1:4] == ["-m", "svp_kernels.train.cli", "memory-depth"]
    args = cli.memory_depth_parser().parse_args(sweep.argv[4:])
    assert (args.device, args.width, args.depths, args.batch_size) == ("cuda", 1024, "2,4,8,16,32", 128)
