"""The build: compiled kernels really registered, OpenMP really on, fallbacks that say why."""
import os
import subprocess
import sys

import pytest
import torch

import adapeft
from adapeft.ops import backend as _backend
from adapeft.ops import layout as L

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
needs_extension = pytest.mark.skipif(_backend._C is None, reason="the compiled extension is not built")


def test_compiled_cpu_kernels_are_registered():
    """With ADAPEFT_REQUIRE_EXT=1 (set by .ci/run) a silent fallback to the reference cannot pass."""
    if os.environ.get("ADAPEFT_REQUIRE_EXT") != "1" and _backend._C is None:
        pytest.skip("extension not built and ADAPEFT_REQUIRE_EXT is not set")
    assert _backend._C is not None
    for op in _backend.OPS:
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"adapeft::{op}", "CPU")
        assert adapeft.BACKENDS[op]["cpu"] == "compiled"


def test_cuda_kernels_registered_when_built_with_cuda():
    if not adapeft.BUILD_INFO["cuda"]:
        pytest.skip("built without CUDA")
    for op in _backend.OPS:
        assert adapeft.BACKENDS[op]["cuda"] == ("cpu only" if op in _backend.CPU_ONLY else "compiled")


@needs_extension
def test_openmp_is_on():
    """Without -fopenmp, at::parallel_for inside the extension silently runs on one thread."""
    assert adapeft.BUILD_INFO["openmp"]
    threads = torch.get_num_threads()
    if threads < 2:
        pytest.skip("torch runs one thread here")
    assert _backend._C.parallel_threads_used(64) == threads


@needs_extension
def test_layout_matches_extension():
    compiled = dict(_backend._C.layout())
    mirror = {
        "chunk_elements": L.CHUNK_ELEMENTS,
        "table_header_words": L.TABLE_HEADER_WORDS,
        "table_tensor_words": L.TABLE_TENSOR_WORDS,
        "states_per_tensor": L.STATES_PER_TENSOR,
        "hyper_words": L.HYPER_WORDS,
        "table_layout_version": L.TABLE_LAYOUT_VERSION,
        "chunk_tensor_shift": L.CHUNK_TENSOR_SHIFT,
        "ledger_header_words": L.LEDGER_HEADER_WORDS,
        "directory_offset_shift": L.DIRECTORY_OFFSET_SHIFT,
        "chunk_unmoved": L.CHUNK_UNMOVED,
        "entry_position_shift": L.ENTRY_POSITION_SHIFT,
        "report_fields": len(L.REPORT_FIELDS),
        "tensor_code_shifts": list(L.TENSOR_CODE_SHIFTS),
    }
    assert compiled == mirror


def test_missing_backend_runs_the_reference_and_says_why():
    run = _backend._fallback("quadratic_fit", "cuda")
    losses = torch.tensor([[5.0, 2.0, 1.0, 2.0, 5.0]], dtype=torch.float64)
    steps = torch.tensor([[-2.0, -1.0, 0.0, 1.0, 2.0]], dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match=r"adapeft\.quadratic_fit: no compiled CUDA kernel \(.+\); running the "
                                            r"pure-PyTorch reference"):
        b, A, *_ = run(losses, steps, torch.ones(1))
    assert A.item() == pytest.approx(2.0) and b.item() == pytest.approx(0.0, abs=1e-12)


def block_extension(folder):
    """A sitecustomize.py in `folder` that makes `import adapeft._C` fail in a Python started with
    `folder` on its PYTHONPATH."""
    (folder / "sitecustomize.py").write_text(
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name == 'adapeft._C':\n"
        "            raise ImportError('blocked by the test')\n"
        "sys.meta_path.insert(0, Block())\n")


def test_import_without_the_extension_falls_back(tmp_path):
    """If adapeft._C cannot load, import still works, warns once, and every op runs the reference."""
    block_extension(tmp_path)
    program = (
        "import warnings, torch\n"
        "with warnings.catch_warnings(record=True) as caught:\n"
        "    warnings.simplefilter('always')\n"
        "    import adapeft\n"
        "assert any('could not be loaded (blocked by the test)' in str(w.message) for w in caught), caught\n"
        "assert all(v['cpu'] == 'reference' for v in adapeft.BACKENDS.values())\n"
        "w = torch.randn(5000) * 0.02; d = torch.randn(5000); w0 = w.clone()\n"
        "steps = torch.tensor([-2e-3, -1e-3, 1e-3, 2e-3])\n"
        "with warnings.catch_warnings():\n"
        "    warnings.simplefilter('ignore')\n"
        "    with adapeft.GroupPerturbation([w], [d], steps) as group:\n"
        "        group.move(0); group.move(3)\n"
        "        assert not torch.equal(w, w0)\n"
        "assert torch.equal(w.view(torch.int32), w0.view(torch.int32))\n"
        "print('fallback ok')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]),
               ADAPEFT_REQUIRE_EXT="0")
    done = subprocess.run([sys.executable, "-c", program], env=env, capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "fallback ok" in done.stdout


def test_require_ext_refuses_a_missing_extension(tmp_path):
    block_extension(tmp_path)
    env = dict(os.environ, PYTHONPATH=str(tmp_path), ADAPEFT_REQUIRE_EXT="1")
    done = subprocess.run([sys.executable, "-c", "import adapeft"], env=env, capture_output=True, text=True,
                          cwd=tmp_path)
    assert done.returncode != 0
    assert "ADAPEFT_REQUIRE_EXT=1 but the compiled extension adapeft._C failed to load" in done.stderr


def test_setup_without_torch_says_what_to_run():
    program = "import sys; sys.modules['torch'] = None; sys.argv = ['setup.py', '--name']; exec(open('setup.py').read())"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode != 0
    assert "install torch first" in done.stderr and "pip install --no-build-isolation -e ." in done.stderr


@pytest.mark.skipif(bool(torch.version.cuda), reason="this torch is a CUDA build")
def test_setup_with_adapeft_cuda_1_fails_loudly_on_cpu_torch():
    env = dict(os.environ, ADAPEFT_CUDA="1")
    done = subprocess.run([sys.executable, "setup.py", "--name"], capture_output=True, text=True, cwd=ROOT, env=env)
    assert done.returncode != 0
    assert "ADAPEFT_CUDA=1 but the CUDA kernels cannot be built" in done.stderr
