"""`gptscale launch-scripts DIR`: the launch scripts, example run configs and DeepSpeed templates
of an installed gptscale, copied out into a folder of the user's."""
from __future__ import annotations

import argparse
import shutil
from pathlib import Path

# (package holding the files, folder under DIR): the repository's launch/, configs/ and ds_configs/,
# shipped inside the wheel (pyproject.toml), copied back into the same layout.
FOLDERS = (("gptscale._launch", "launch"), ("gptscale._configs", "configs"), ("gptscale._ds_configs", "ds_configs"))

DESCRIPTION = """\
Copy the launch scripts of this gptscale install into DIR, in the repository's layout, so that
the README's commands run from DIR as they do from a clone:

  DIR/launch/      torchrun.sh, deepspeed.sh, mpirun.sh, slurm/*.sbatch, accelerate/*.yaml
  DIR/configs/     the example run configs (tiny.yaml, sft-lora.yaml, sweep-tiny.yaml)
  DIR/ds_configs/  the DeepSpeed templates, to edit and name by path (train.ds_config=ds_configs/my.json);
                   a template named without a path (train.ds_config=zero3_offload) is the packaged one

Nothing is overwritten unless --force: if any of these files already exists in DIR, nothing is
copied. Works the same from a wheel (`pip install .`) and from an editable install.

example:
  gptscale launch-scripts ~/gptscale-run && cd ~/gptscale-run
  launch/torchrun.sh --config configs/tiny.yaml --set data.path=null --set data.synthetic=true
  sbatch -N 2 launch/slurm/pretrain.sbatch --config configs/tiny.yaml
"""


def packaged_files() -> list[tuple[Path, Path]]:
    """(file in the installed package, its path relative to DIR), the packages' __init__.py left out."""
    from gptscale.ds_templates import packaged_folder

    files = []
    for package, name in FOLDERS:
        root = packaged_folder(package)
        for path in sorted(root.rglob("*")):
            relative = path.relative_to(root)
            if path.is_file() and path.name != "__init__.py" and "__pycache__" not in relative.parts \
                    and path.suffix != ".pyc":
                files.append((path, Path(name) / relative))
    return files


def copy_launch_scripts(target: Path, force: bool = False) -> list[Path]:
    """Copy every packaged file into `target` (created if missing); the copied paths. Refuses,
    copying nothing, if `target` is not a folder or (without `force`) already holds one of them."""
    from gptscale.errors import UserError

    if target.exists() and not target.is_dir():
        raise UserError(f"launch-scripts: {str(target)!r} is not a folder; name a folder to copy the scripts into")
    files = packaged_files()
    clashes = [str(relative) for _, relative in files if (target / relative).exists() or (target / relative).is_symlink()]
    if clashes and not force:
        more = f" and {len(clashes) - 3} more" if len(clashes) > 3 else ""
        raise UserError(f"launch-scripts: {', '.join(clashes[:3])}{more} already exist in {str(target)!r}; "
                        f"pass --force to overwrite them, or name another folder")
    copied = []
    try:
        for source, relative in files:
            destination = target / relative
            destination.parent.mkdir(parents=True, exist_ok=True)
            if destination.is_symlink():
                destination.unlink()  # --force replaces the link, never writes through it
            shutil.copyfile(source, destination)
            executable = source.read_bytes()[:2] == b"#!"
            destination.chmod(0o755 if executable else 0o644)
            copied.append(destination)
    except OSError as exc:
        raise UserError(f"launch-scripts: cannot write {exc.filename or str(target)!r} ({exc.strerror}); "
                        f"name a folder you can write to") from None
    return copied


def cmd_launch_scripts(args: argparse.Namespace) -> int:
    target = Path(args.dir)
    copied = copy_launch_scripts(target, args.force)
    counts = {name: sum(1 for p in copied if p.relative_to(target).parts[0] == name) for _, name in FOLDERS}
    print(f"copied {len(copied)} files into {target}: " + ", ".join(f"{name}/ ({n})" for name, n in counts.items()))
    print(f"from {target}: launch/torchrun.sh --config configs/tiny.yaml (its data.path runs/data comes from "
          f"`gptscale data prepare`; --set data.path=null --set data.synthetic=true runs without it)")
    return 0


def add_parsers(sub) -> None:
    p = sub.add_parser("launch-scripts", help="copy launch/, configs/ and ds_configs/ of this install into a folder",
                       description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dir", metavar="DIR", help="folder to copy into (created if missing)")
    p.add_argument("--force", action="store_true", help="overwrite files that already exist in DIR")
    p.set_defaults(func=cmd_launch_scripts)
