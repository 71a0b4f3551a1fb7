"""Sub-commands of `rt-mindeye` (ingest): ``convert`` DICOM files or folders to NIfTI.

Rules (printed by ``rt-mindeye convert --help``):

* INPUT may be files or folders (searched recursively, hidden files skipped). Files found in folders that are not
  DICOM at all are skipped silently; a file named on the command line that is not DICOM is an error.
* A DICOM that cannot be converted (incomplete, corrupt, unsupported, short last volume) is an error naming the
  file and the problem, unless ``--skip-bad`` is given: then it is reported on stderr and left out.
* Duplicates (same SOPInstanceUID) are read once.
* One series -> one NIfTI (3-D for one volume, 4-D for several, in volume-number order). Several series and ``-o``
  a file name -> error naming the series (pick one with ``--series N``); ``-o`` an existing folder or a name ending
  in ``/`` -> one file per series, ``series-NNN_<description>.nii.gz``.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from pathlib import Path

from rt_mindeye.errors import DicomReadError, RtMindEyeError
from rt_mindeye.volume import Volume
from rt_mindeye.process import cli_path



class ConvertError(RtMindEyeError):
    """The command line asks for something the inputs cannot give (several series into one file, no input, ...)."""


def register(subparsers) -> None:
    """Add ``convert``."""
    parser = subparsers.add_parser(
        "convert",
        help="convert DICOM files or folders (Siemens mosaic, Enhanced MR, single slices) to NIfTI",
        description=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("inputs", nargs="+", metavar="INPUT", type=cli_path, help="DICOM files or folders")
    parser.add_argument(
        "-o", "--output", required=True, type=cli_path, help="OUT.nii[.gz], or a folder for one file per series"
    )
    parser.add_argument("--series", type=int, default=None, help="convert only this SeriesNumber")
    parser.add_argument("--json", action="store_true", help="also write a BIDS-style JSON sidecar per NIfTI")
    parser.add_argument(
        "--skip-bad", action="store_true", help="report unconvertible DICOM files on stderr and go on without them"
    )
    parser.set_defaults(func=run_convert)


def collect_files(inputs: list[Path]) -> tuple[list[Path], set[Path]]:
    """(all candidate files in order, the ones named explicitly). Missing inputs raise DicomReadError."""
    files: list[Path] = []
    explicit: set[Path] = set()
    for item in inputs:
        if item.is_dir():
            found = [
                path
                for path in sorted(item.rglob("*"))
                if path.is_file() and not any(part.startswith(".") for part in path.relative_to(item).parts)
            ]
            files.extend(found)
        elif item.is_file():
            files.append(item)
            explicit.add(item)
        else:
            raise DicomReadError(item, "no such file or folder")
    return files, explicit


def _is_not_dicom(error: RtMindEyeError) -> bool:
    return isinstance(error, DicomReadError) and "not a DICOM" in str(error)


def series_file_name(volume: Volume) -> str:
    description = str(volume.header.get("SeriesDescription") or volume.header.get("ProtocolName") or "")
    safe = re.sub(r"[^A-Za-z0-9._-]+", "_", description).strip("_")[:60]
    return f"series-{volume.series:03d}" + (f"_{safe}" if safe else "") + ".nii.gz"


def run_convert(args) -> int:
    from rt_mindeye.ingest.dicom import read_series
    from rt_mindeye.ingest.nifti import save_nifti

    files, explicit = collect_files(args.inputs)
    if not files:
        raise ConvertError("no files found in " + ", ".join(str(p) for p in args.inputs))
    skipped: list[str] = []

    def on_error(path: Path, error: RtMindEyeError) -> None:
        if _is_not_dicom(error) and path not in explicit:
            return  # stray files in a folder (README, licence, ...)
        if not args.skip_bad:
            raise error
        skipped.append(str(error))
        print(f"rt-mindeye convert: skipped {error}", file=sys.stderr)

    volumes = read_series(files, on_error=on_error)
    unique: dict[str, Volume] = {}
    for volume in volumes:
        key = volume.sop_instance_uid or f"{volume.source}#{id(volume)}"
        unique.setdefault(key, volume)
    duplicates = len(volumes) - len(unique)
    by_series: dict[int, list[Volume]] = defaultdict(list)
    for volume in unique.values():
        by_series[volume.series].append(volume)
    if args.series is not None:
        if args.series not in by_series:
            raise ConvertError(
                f"series {args.series} not found; the inputs hold series {', '.join(map(str, sorted(by_series)))}"
            )
        by_series = {args.series: by_series[args.series]}
    if not by_series:
        raise ConvertError("no convertible DICOM volumes in " + ", ".join(str(p) for p in args.inputs))

    output = args.output
    to_folder = output.is_dir() or str(output).endswith(("/", "\\"))
    if len(by_series) > 1 and not to_folder:
        listing = ", ".join(
            f"{number} ({len(vols)} volume{'s' if len(vols) > 1 else ''}"
            f"{', ' + str(vols[0].header['SeriesDescription']) if vols[0].header.get('SeriesDescription') else ''})"
            for number, vols in sorted(by_series.items())
        )
        raise ConvertError(
            f"{len(by_series)} series in the input: {listing}; pass --series N, or -o a folder for one file per series"
        )
    for number, series_volumes in sorted(by_series.items()):
        series_volumes.sort(key=lambda v: (v.volume, v.acquisition_time or 0.0))
        target = output / series_file_name(series_volumes[0]) if to_folder else output
        if not str(target).endswith((".nii", ".nii.gz")):
            raise ConvertError(f"output {target} must end in .nii or .nii.gz (or be a folder)")
        save_nifti(series_volumes, target, json_sidecar=args.json)
        shape = "x".join(map(str, series_volumes[0].shape)) + (
            f"x{len(series_volumes)}" if len(series_volumes) > 1 else ""
        )
        tr = f", TR {series_volumes[0].tr:g} s" if series_volumes[0].tr else ""
        print(f"wrote {target} ({shape}, series {number}{tr})")
    if duplicates:
        print(f"note: {duplicates} duplicate file(s) (same SOPInstanceUID) read once", file=sys.stderr)
    return 0


__all__ = ["ConvertError", "collect_files", "register", "run_convert", "series_file_name"]
