"""Make ``asv publish``'s HTML history work without network: vendor its CDN scripts from npm.

Usage: ``python scripts/asv_offline_html.py [asv_benches/.asv/html]`` (needs ``npm``).

asv 0.6's ``index.html`` loads jQuery, flot, bootstrap, stupidtable and md5
from CDNs; on a machine that reaches only package registries (these
machines) the page then shows "Can not determine continental origin of
swallow" and no graph.  This fetches the same releases with ``npm pack``
(stupidtable: 1.1.3, the npm release nearest the CDN's 1.0.1), copies the
files into ``vendor/`` beside the page and points every CDN URL there,
dropping the tags' ``integrity`` hashes (they are the CDN's minified builds').
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

#: CDN URL -> (npm package, file inside the package).
VENDORED = {
    "https://code.jquery.com/jquery-3.3.1.min.js": ("jquery@3.3.1", "dist/jquery.min.js"),
    "https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.min.js": (
        "flot@0.8.3",
        "jquery.flot.js",
    ),
    **{
        f"https://cdnjs.cloudflare.com/ajax/libs/flot/0.8.3/jquery.flot.{name}.min.js": (
            "flot@0.8.3",
            f"jquery.flot.{name}.js",
        )
        for name in ("time", "selection", "categories")
    },
    "https://cdn.jsdelivr.net/npm/flot-orderbars@1.0.0/js/jquery.flot.orderBars.js": (
        "flot-orderbars@1.0.0",
        "js/jquery.flot.orderBars.js",
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/stupidtable/1.0.1/stupidtable.min.js": (
        "stupid-table-plugin@1.1.3",
        "stupidtable.min.js",
    ),
    "https://cdnjs.cloudflare.com/ajax/libs/blueimp-md5/2.19.0/js/md5.min.js": (
        "blueimp-md5@2.19.0",
        "js/md5.min.js",
    ),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/js/bootstrap.min.js": (
        "bootstrap@3.1.1",
        "dist/js/bootstrap.min.js",
    ),
    "https://cdn.jsdelivr.net/npm/bootstrap@3.1.1/dist/css/bootstrap.min.css": (
        "bootstrap@3.1.1",
        "dist/css/bootstrap.min.css",
    ),
}


def vendor(html: Path) -> None:
    """Fetch every package once, copy its file to ``html/vendor``, rewrite the pages."""
    target = html / "vendor"
    target.mkdir(exist_ok=True)
    packages = sorted({package for package, _ in VENDORED.values()})
    with tempfile.TemporaryDirectory() as work:
        subprocess.run(["npm", "pack", "--silent", *packages], cwd=work, check=True)
        unpacked = {}
        for package in packages:
            name, version = package.rsplit("@", 1)
            folder = Path(work) / name
            with tarfile.open(Path(work) / f"{name}-{version}.tgz") as archive:
                archive.extractall(folder, filter="data")
            unpacked[package] = folder / "package"
        for url, (package, inner) in VENDORED.items():
            local = f"{package.replace('@', '-')}-{Path(inner).name}"
            shutil.copyfile(unpacked[package] / inner, target / local)
            for page in html.glob("*.html"):
                page.write_text(page.read_text().replace(url, f"vendor/{local}"))
    for page in html.glob("*.html"):
        page.write_text(re.sub(r'\s+integrity="[^"]*"', "", page.read_text()))


if __name__ == "__main__":
    vendor(Path(sys.argv[1] if len(sys.argv) > 1 else "asv_benches/.asv/html"))
