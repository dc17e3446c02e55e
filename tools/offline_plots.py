"""The `dvc plots` page for a browser without internet: vega, vega-lite and vega-embed inlined into
.dvc/plots/offline.html (from the npm registry, once), which this clone's DVC then uses.

    python tools/offline_plots.py          # make plots-offline
    dvc config --local --unset plots.html_template   # back to the page that loads them from a CDN

DVC's page (.dvc/plots/page.html, set in .dvc/config) loads the three libraries from cdn.jsdelivr.net
and says so on the page when they do not load. This writes the same page with the libraries inside
(about 1 MB, the versions DVC's page names) and sets `plots.html_template` in .dvc/config.local, which
git ignores: `dvc plots show` and `dvc plots diff` then write pages that draw with no network.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

PAGE = Path(".dvc/plots/page.html")  # of the project in the current folder
OFFLINE = Path(".dvc/plots/offline.html")


def libraries() -> list[str]:
    """The packages DVC's page loads from the CDN, as npm names them: ['vega@5.20.2', ...]."""
    from dvc_render.vega import VegaRenderer

    return re.findall(r"cdn\.jsdelivr\.net/npm/([\w-]+@[\d.]+)", VegaRenderer.SCRIPTS)


def inline_scripts(packages: list[str], folder: Path) -> str:
    """<script> elements holding each package's minified build, fetched with `npm pack` (npm's cache first)."""
    if not shutil.which("npm"):
        sys.exit("error: the offline plots page needs npm to fetch " + ", ".join(packages) + ": install Node.js "
                 "and npm (Debian: apt-get install npm), then run make plots-offline again")  # fmt: skip
    scripts = []
    for package in packages:
        packed = subprocess.run(["npm", "pack", package, "--prefer-offline", "--silent"], cwd=folder,
                                capture_output=True, text=True, timeout=600)  # fmt: skip
        if packed.returncode != 0:
            reason = (packed.stderr.strip().splitlines() or ["no output"])[-1]
            sys.exit(f"error: npm pack {package} failed ({reason}): the npm registry must be reachable once")
        name = package.rsplit("@", 1)[0]
        with tarfile.open(folder / packed.stdout.split()[-1]) as tar:
            code = tar.extractfile(f"package/build/{name}.min.js").read().decode()
        code = re.sub(r"</(script)", r"<\\/\1", code, flags=re.I)  # the page's parser would end the element there
        scripts.append(f"<script>/* {package} */\n{code}\n</script>")
    return "\n".join(scripts)


def main() -> None:
    argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter).parse_args()
    if not PAGE.is_file():
        sys.exit(f"error: {PAGE} not found: run this in the project's folder (make plots-offline)")
    packages = libraries()
    with tempfile.TemporaryDirectory() as folder:
        scripts = inline_scripts(packages, Path(folder))
    OFFLINE.write_text(PAGE.read_text().replace("{scripts}", scripts))
    subprocess.run(["dvc", "config", "--local", "plots.html_template", "plots/offline.html"], check=True)
    print(f"{OFFLINE}: {', '.join(packages)} inlined ({OFFLINE.stat().st_size / 1e6:.1f} MB); "
          f"dvc plots show and diff use it in this clone (.dvc/config.local)")  # fmt: skip


if __name__ == "__main__":
    main()
