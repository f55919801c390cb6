"""``dejavu convert``: a Hugging Face OPT directory -> a dejavu orbax checkpoint (or back).

`dejavu_jax.cli` wires it in with ``add_parser(subparsers)``; the subcommand's handler is
``args.func(args)`` (returns the exit status; errors are `dejavu_jax.errors.DejavuError`).
"""

from __future__ import annotations

import argparse

from dejavu_jax.checkpoint import SUPPORTED_DTYPES

DESCRIPTION = """\
Convert an OPT checkpoint.

By default SRC_DIR is a Hugging Face OPT directory (config.json with model.safetensors,
sharded model-*.safetensors + model.safetensors.index.json, or pytorch_model.bin) and
OUT_DIR becomes a dejavu orbax checkpoint: params in --dtype, config.json, the tokenizer
files and a completion marker. Tensors are streamed one at a time (peak host memory about
one shard plus the result) and the output appears only when complete.

With --to hf, SRC_DIR may be either kind and OUT_DIR becomes a Hugging Face directory
(safetensors, sharded above --max-shard-size) that OPTForCausalLM.from_pretrained loads.
"""

EPILOG = """\
examples:
  dejavu convert ~/models/opt-1.3b ckpt/opt-1.3b --dtype bfloat16
  dejavu convert ckpt/opt-1.3b export/opt-1.3b-hf --to hf --max-shard-size 2GB
"""


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Add the ``convert`` subcommand to an argparse ``subparsers`` object."""
    p = subparsers.add_parser(
        "convert", help="convert a Hugging Face OPT directory to a dejavu orbax checkpoint",
        description=DESCRIPTION, epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src_dir", metavar="SRC_DIR",
                   help="Hugging Face OPT directory (or a dejavu checkpoint, with --to hf)")
    p.add_argument("out_dir", metavar="OUT_DIR", help="directory to create")
    p.add_argument("--dtype", default="bfloat16", choices=SUPPORTED_DTYPES,
                   help="parameter dtype of the output (default: bfloat16)")
    p.add_argument("--to", default="orbax", choices=("orbax", "hf"),
                   help="output format (default: orbax)")
    p.add_argument("--max-shard-size", default="5GB",
                   help="with --to hf: largest safetensors file, e.g. 5GB, 500MB (default: 5GB)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=run)
    return p


def run(args: argparse.Namespace) -> int:
    from dejavu_jax import checkpoint

    if args.to == "orbax":
        out = checkpoint.convert(args.src_dir, args.out_dir, args.dtype,
                                 overwrite=args.overwrite, progress=not args.quiet)
    else:
        model = checkpoint.load_opt(args.src_dir, args.dtype, sharding=checkpoint.host_sharding(),
                                    progress=not args.quiet)
        out = checkpoint.save_hf(model, args.out_dir, max_shard_size=args.max_shard_size,
                                 overwrite=args.overwrite)
    print(f"wrote {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """Stand-alone entry point: ``python -m dejavu_jax.cli_convert SRC_DIR OUT_DIR ...``."""
    parser = argparse.ArgumentParser(prog="dejavu")
    add_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["convert", *(argv if argv is not None else __import__("sys").argv[1:])])
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
