"""Make PyPI's CUDA-linked torchvision importable beside the +cpu torch (idempotent).

torchvision/_meta_registrations.py registers fake kernels for torchvision::nms/qnms without checking that the
native extension loaded; with a CUDA build next to a CPU torch it did not, and the import raises
``RuntimeError: operator torchvision::nms does not exist``. We route those registrations through a guard.
"""
import importlib.util
import pathlib
import sys

spec = importlib.util.find_spec("torchvision")
if spec is None or spec.origin is None:
    sys.exit(0)
path = pathlib.Path(spec.origin).parent / "_meta_registrations.py"
text = path.read_text()
if "_rf = " in text:
    sys.exit(0)
anchor = "import torchvision.extension  # noqa: F401\n"
if anchor not in text:
    sys.exit(f"patch_torchvision: unexpected layout of {path}; update scripts/patch_torchvision.py")
guard = ("\n_rf = torch.library.register_fake if torchvision.extension._has_ops() "
         "else (lambda *a, **k: (lambda f: f))\n")
text = text.replace(anchor, anchor + guard, 1).replace("@torch.library.register_fake(", "@_rf(")
path.write_text(text)
print(f"patch_torchvision: patched {path}")
