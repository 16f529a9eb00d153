"""``python -m kvbench [calibrate] key=value ...`` (Hydra command line)."""

from __future__ import annotations

import sys

import hydra

from kvbench.config import check_overrides, conf_dir, register_configs


def _task(cfg) -> None:
    from kvbench.errors import UserError
    from kvbench.run import run

    try:
        run(cfg)
    except UserError as e:
        print(f"kvbench: error: {e}", file=sys.stderr)
        sys.exit(2)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "calibrate":
        sys.argv = [sys.argv[0], *sys.argv[2:], "command=calibrate"]
    register_configs()
    error = check_overrides(sys.argv[1:])
    if error:
        print(f"kvbench: error: {error}", file=sys.stderr)
        sys.exit(2)
    hydra.main(config_path=conf_dir(), config_name="config", version_base="1.3")(_task)()


if __name__ == "__main__":
    main()
