"""Evaluation records: a study's finished reports, kept in git so that its tables outlive the
machine that trained them.

A study writes OUT/runs/<name>/ with its checkpoints (never committed) and, once the run is
finished, report.json (the final evaluation, per-image bpd included, so paired differences
can be recomputed), wall_seconds.txt and command.txt. `save` packs those small files of every
finished run into one gzipped JSON per run, RECORDS/<name>.json.gz; `restore` writes them back
into OUT/runs/<name>/, where the study script finds the run finished: its tables print from
the restored reports and a resumed study skips those runs. Samples (samples.npz) are not
kept: the sample numbers in report.json are; rescore_samples.py lists a restored run as
having no samples.

  python experiments/records.py save --out runs/study_c --records experiments/records/study_c
  python experiments/records.py restore --records experiments/records/study_c --out runs/study_c

Neither command overwrites a file that differs from the one it would write unless asked
(--replace): a run re-trained under the same name must be a decision, not an accident.
"""
from __future__ import annotations

import argparse
import gzip
import json
import os
import sys

FILES = ("report.json", "wall_seconds.txt", "command.txt",
         os.path.join("evals", "probe_w", "report.json"))  # the last: a w probe added later
SUFFIX = ".json.gz"


def pack(run_dir: str) -> dict | None:
  """{relative path: text} of a finished run's FILES; None when it has no report.json."""
  if not os.path.exists(os.path.join(run_dir, "report.json")):
    return None
  files = {}
  for rel in FILES:
    path = os.path.join(run_dir, rel)
    if os.path.exists(path):
      with open(path) as fh:
        files[rel] = fh.read()
  return {"files": files}


def encode(record: dict) -> bytes:
  """Gzipped JSON with a fixed header time, so the same record is the same bytes."""
  raw = json.dumps(record, sort_keys=True, indent=0).encode()
  return gzip.compress(raw, mtime=0)


def decode(data: bytes) -> dict:
  return json.loads(gzip.decompress(data))


def _write(path: str, data, replace: bool, log) -> bool:
  """Writes `data` (bytes or str) unless `path` holds something else and not `replace`."""
  mode = "wb" if isinstance(data, bytes) else "w"
  if os.path.exists(path):
    with open(path, "rb" if mode == "wb" else "r") as fh:
      if fh.read() == data:
        return False
    if not replace:
      log(f"kept {path}: it differs from the one to write (records.py --replace overwrites it)")
      return False
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = path + ".tmp"
  with open(tmp, mode) as fh:
    fh.write(data)
  os.replace(tmp, path)
  return True


def save_run(out: str, name: str, records: str, replace: bool = False, log=print) -> bool:
  """Packs OUT/runs/<name> into RECORDS if it is finished; True when a record was written."""
  record = pack(os.path.join(out, "runs", name))
  return record is not None and _write(os.path.join(records, name + SUFFIX), encode(record),
                                       replace, log)


def save(out: str, records: str, replace: bool = False, log=print) -> list:
  """Packs every finished run under OUT/runs into RECORDS; returns the names written."""
  runs = os.path.join(out, "runs")
  if not os.path.isdir(runs):
    raise FileNotFoundError(f"records save: no runs folder {runs!r}")
  written = [name for name in sorted(os.listdir(runs))
             if save_run(out, name, records, replace, log)]
  log(f"saved {len(written)} record(s) to {records}: {', '.join(written) or 'none new'}")
  return written


def restore(records: str, out: str, replace: bool = False, log=print) -> list:
  """Unpacks every RECORDS/<name>.json.gz into OUT/runs/<name>/; returns the names written."""
  if not os.path.isdir(records):
    raise FileNotFoundError(f"records restore: no records folder {records!r}")
  written = []
  for fname in sorted(os.listdir(records)):
    if not fname.endswith(SUFFIX):
      continue
    name = fname[:-len(SUFFIX)]
    with open(os.path.join(records, fname), "rb") as fh:
      record = decode(fh.read())
    run_dir = os.path.join(out, "runs", name)
    changed = [_write(os.path.join(run_dir, rel), text, replace, log)
               for rel, text in sorted(record["files"].items())]
    if any(changed):
      written.append(name)
  log(f"restored {len(written)} run(s) into {out}: {', '.join(written) or 'none new'}")
  return written


def main(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("action", choices=("save", "restore"))
  p.add_argument("--out", required=True, help="the study's output folder (holds runs/)")
  p.add_argument("--records", required=True, help="the records folder (in git)")
  p.add_argument("--replace", action="store_true", help="overwrite files that differ")
  args = p.parse_args(argv)
  try:
    (save(args.out, args.records, args.replace) if args.action == "save"
     else restore(args.records, args.out, args.replace))
  except FileNotFoundError as e:
    sys.exit(str(e))


if __name__ == "__main__":
  main()
