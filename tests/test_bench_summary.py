"""bench matmul's limit and bench summary's table: the ratios the performance target is read from."""

import json

import pytest

from spcl_jax import metrics
from spcl_jax.bench import matmul, summary
from spcl_jax.configs import vitb512


def test_matmul_bench_prints_the_images_per_s_limit_of_the_config(capsys):
  assert matmul.main(["--config=spcl_jax/configs/vitb512.py", "--size=128", "--steps=2",
                      "--warmup_steps=1"]) == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  assert result["variant"] == "matmul" and result["size"] == 128
  per_image = metrics.train_flops_per_image(vitb512.get_config())
  assert result["gflop_per_image"] == pytest.approx(per_image / 1e9)
  assert result["tflops_per_s"] == pytest.approx(2 * 128 ** 3 / (result["ms"] / 1e3) / 1e12)
  assert result["images_per_s_limit"] == pytest.approx(result["tflops_per_s"] * 1e12 / per_image)


def _line(**fields):
  return json.dumps(fields)


def test_summary_sets_each_variant_against_the_matmul_limit_and_torch_compile():
  setting = dict(batch=256, dtype="bfloat16", device="NVIDIA H200")
  log = [
      "some progress line that is not JSON",
      _line(variant="matmul", device="NVIDIA H200", size=8192, dtype="bfloat16",
            tflops_per_s=796.0, images_per_s_limit=3640.0),
      _line(variant="jax", attention="cudnn", remat="none", images_per_s=2548.0, step_ms=100.5,
            **setting),
      _line(variant="torch-eager", attention="sdpa", remat="none", images_per_s=1336.0,
            step_ms=191.6, **setting),
      _line(variant="torch-compile", attention="sdpa", remat="none", images_per_s=1640.0,
            step_ms=156.1, **setting),
      _line(variant="jax", attention="xla", remat="none", images_per_s=1202.0, step_ms=213.0,
            batch=128, dtype="bfloat16", device="NVIDIA H200"),  # no reference at batch 128
      '{"not a result": 1}',
  ]
  rows = summary.table(summary.read_results(log)).splitlines()
  cudnn = next(r for r in rows if "| jax | cudnn |" in r).split("|")
  assert cudnn[6].strip() == "2548" and cudnn[8].strip() == "0.70"  # 2548 / 3640
  assert cudnn[9].strip() == "1.55"  # 2548 / 1640, the compile reference of the same setting
  compiled = next(r for r in rows if "| torch-compile |" in r).split("|")
  assert compiled[9].strip() == "1.00"
  xla = next(r for r in rows if "| jax | xla |" in r).split("|")
  assert xla[8].strip() == "0.33" and xla[9].strip() == ""  # other batch: no ratio is invented
  assert rows[-1] == "device: NVIDIA H200"


def test_summary_without_a_matmul_line_leaves_that_ratio_blank(tmp_path, capsys):
  log = tmp_path / "log.txt"
  log.write_text(_line(variant="jax", attention="xla", remat="none", images_per_s=10.0,
                       step_ms=1.0, batch=4, dtype="float32", device="cpu") + "\n")
  assert summary.main([str(log)]) == 0
  row = next(r for r in capsys.readouterr().out.splitlines() if "| jax |" in r).split("|")
  assert row[8].strip() == "" and row[9].strip() == ""
  empty = tmp_path / "empty.txt"
  empty.write_text("nothing here\n")
  assert summary.main([str(empty)]) == 1


def test_profile_sums_the_accelerator_s_operations_per_step_and_kind():
  from spcl_jax.bench import profile
  gpu, host = 1, 2
  events = [
      {"ph": "M", "name": "process_name", "pid": gpu, "args": {"name": "/device:GPU:0"}},
      {"ph": "M", "name": "process_name", "pid": host, "args": {"name": "/host:CPU"}},
      {"ph": "X", "pid": gpu, "name": "sm90_xmma_gemm_bf16bf16_bf16f32", "dur": 600.0},
      {"ph": "X", "pid": gpu, "name": "sm90_xmma_gemm_bf16bf16_bf16f32", "dur": 600.0},
      {"ph": "X", "pid": gpu, "name": "cudnn_generated_fort_native_sdpa_sm90", "dur": 300.0},
      {"ph": "X", "pid": gpu, "name": "loop_add_fusion", "dur": 200.0},
      {"ph": "X", "pid": gpu, "name": "transpose.12", "dur": 100.0},
      {"ph": "X", "pid": gpu, "name": "ncclDevKernel_AllReduce_Sum_f32", "dur": 200.0},
      {"ph": "X", "pid": host, "name": "PjitFunction(train_step)", "dur": 99999.0},  # not device
  ]
  result = profile.summarise(events, steps=2, top=3)
  assert result["where"] == "/device:GPU:0"
  assert result["busy_ms_per_step"] == pytest.approx(2000 / 1e3 / 2)
  kinds = result["kinds"]
  assert kinds["matmul"]["ms_per_step"] == pytest.approx(0.6)
  assert kinds["matmul"]["share"] == pytest.approx(0.6)
  assert kinds["attention"]["ms_per_step"] == pytest.approx(0.15)
  assert {k: round(v["share"], 2) for k, v in kinds.items()} == {
      "matmul": 0.6, "attention": 0.15, "fusion": 0.1, "collective": 0.1,
      "copy/transpose": 0.05}
  assert [op["name"] for op in result["top"]][0] == "sm90_xmma_gemm_bf16bf16_bf16f32"
  assert result["top"][0]["calls_per_step"] == 1
