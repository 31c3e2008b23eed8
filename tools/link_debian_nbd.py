#!/usr/bin/env python
"""Make Debian's libnbd Python binding (``python3-libnbd``) importable from a venv.

libnbd is not on PyPI. Debian ships it for its own ``/usr/bin/python3`` under
``/usr/lib/python3/dist-packages``; a venv made from another Python 3.11 (pyenv's, here) does not
see that directory, not even with ``--system-site-packages``. This links exactly two files into
the venv's site-packages: ``nbd.py`` and the ``libnbdmod`` extension, and only when

- the venv's Python cannot import ``nbd`` already, and
- the extension was built for that Python's ABI (its name ends with the venv's
  ``sysconfig.get_config_var('EXT_SUFFIX')``).

Nothing else of Debian's dist-packages becomes visible. Otherwise it says why and exits 0 (the
datastore's pull capture then reports the missing library when it is used); ``--require`` makes
that an error.

Usage: ``link_debian_nbd.py VENV_PYTHON [--dist-packages DIR] [--require]``
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import subprocess
import sys

DIST_PACKAGES = '/usr/lib/python3/dist-packages'

_PROBE = r'''
import json, sys, sysconfig
try:
    import nbd
    found = getattr(nbd, '__file__', '?')
except ImportError:
    found = None
print(json.dumps({'found': found, 'ext_suffix': sysconfig.get_config_var('EXT_SUFFIX'),
                  'purelib': sysconfig.get_paths()['purelib']}))
'''


def probe(python):
    out = subprocess.run([python, '-c', _PROBE], check=True, capture_output=True, text=True)
    return json.loads(out.stdout)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument('python', help="the venv's python (e.g. .venv/bin/python)")
    parser.add_argument('--dist-packages', default=DIST_PACKAGES)
    parser.add_argument('--require', action='store_true',
                        help='fail when nbd cannot be made importable')
    args = parser.parse_args(argv)

    def give_up(message):
        print(f"link_debian_nbd: {message}", file=sys.stderr)
        return 1 if args.require else 0

    info = probe(args.python)
    if info['found']:
        print(f"link_debian_nbd: {args.python} already imports nbd ({info['found']})")
        return 0
    module = os.path.join(args.dist_packages, 'nbd.py')
    if not os.path.isfile(module):
        return give_up(f"{module} is missing: install Debian's python3-libnbd "
                       "(apt-get install python3-libnbd); pull capture needs it")
    extensions = sorted(glob.glob(os.path.join(args.dist_packages, 'libnbdmod*.so')))
    matching = [e for e in extensions if e.endswith(info['ext_suffix'])]
    if not matching:
        return give_up(
            f"Debian's libnbd extension ({', '.join(map(os.path.basename, extensions)) or 'none'})"
            f" is not built for {args.python} (its extensions end with {info['ext_suffix']}); "
            "make the venv from Debian's /usr/bin/python3 (python3 -m venv "
            "--system-site-packages) to use it")
    site = info['purelib']
    for source in (module, matching[0]):
        link = os.path.join(site, os.path.basename(source))
        if os.path.islink(link) or os.path.exists(link):
            os.unlink(link)
        os.symlink(source, link)
        print(f"link_debian_nbd: {link} -> {source}")
    check = probe(args.python)
    if not check['found']:
        return give_up(f"linked, but {args.python} still cannot import nbd")
    return 0


if __name__ == '__main__':
    sys.exit(main())
