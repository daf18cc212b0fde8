"""The committed auto table (svp_kernels/backends/auto_table.py) is what tools/auto_table.py makes of the committed
benchmark CSV: no number in it was typed by hand, and a measurement added to the CSV is one rerun away."""

import importlib.util
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def generator():
    spec = importlib.util.spec_from_file_location("auto_table_tool", ROOT / "tools" / "auto_table.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_table_is_generated_from_the_committed_csv():
    tool = generator()
    expected = tool.render(ROOT / tool.DEFAULT_CSV, tool.DEFAULT_CSV)
    assert tool.TABLE.read_text() == expected, "rerun python tools/auto_table.py"


def test_unmeasured_candidates_stay_unmeasured_and_the_newest_row_counts(tmp_path):
    """A candidate without a row is written UNMEASURED, not a number; of two rows of one candidate the newer
    one is taken; a failed variant (empty median) is no measurement."""
    tool = generator()
    header = "op,B,D,C,dtype,projection,variant,median_ms,device,timestamp\n"
    rows = ["fused_local_loss,8,64,10,float32,dense,cuda,0.5,GPU,2026-01-02T00:00:00+00:00",
            "fused_local_loss,8,64,10,float32,dense,cuda,0.9,GPU,2026-01-01T00:00:00+00:00",
            "fused_local_loss,8,64,10,float32,dense,triton,0.4,GPU,2026-01-01T00:00:00+00:00",
            "fused_local_loss,8,64,10,float32,dense,cuda-gemm,,GPU,2026-01-01T00:00:00+00:00",
            "fused_local_loss,8,64,10,float32,dense,eager,0.1,GPU,2026-01-01T00:00:00+00:00"]
    path = tmp_path / "GPU.csv"
    path.write_text(header + "\n".join(rows) + "\n")
    text = tool.render(path, "GPU.csv")
    namespace = {}
    exec(compile(text, "auto_table", "exec"), namespace)  # the generated module: literals only
    (row,) = namespace["ROWS"]
    assert row[:5] == (8, 64, 10, "float32", "dense")
    assert row[5] == (0.5, tool.UNMEASURED, 0.4) and row[6] == "triton"
