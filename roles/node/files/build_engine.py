"""Build the engine as one archive for the nodes: a zip of plugins/module_utils/_engine stored as
the package ``guestvault_engine``, importable with the archive on sys.path (zipimport).

    build_engine.py ENGINE_DIR [ARCHIVE]

Without ARCHIVE the archive goes into a new temporary directory. Prints the archive's path.

The same sources give the same bytes, whatever the controller: entries sorted, fixed timestamps
and modes, *.py files only (no __pycache__), and stored uncompressed, because deflate's output
depends on the zlib build (zlib-ng gives other bytes) and a node would then see a change whenever
another controller deploys. The node role's copy is idempotent because of this.

Run by the guestvault.backup.node role on the controller; Python 3.8+, standard library only.
"""
import os
import sys
import tempfile
import zipfile

PACKAGE = 'guestvault_engine'
ARCHIVE_NAME = 'guestvault-engine.pyz'
# What the node command imports first: a directory without it is not the engine.
ENTRY_MODULE = os.path.join('run', 'node_command.py')
# `python3 guestvault-engine.pyz ...` runs the node command too (handy with another interpreter).
MAIN = (b"import sys\n\n"
        b"from guestvault_engine.run.node_command import main\n\n"
        b"sys.exit(main())\n")
FIXED_TIME = (1980, 1, 1, 0, 0, 0)


def engine_files(engine_dir):
    """(archive name, path) of every engine module, sorted; hidden and cached files left out."""
    found = []
    for directory, subdirs, files in os.walk(engine_dir):
        subdirs[:] = [d for d in subdirs if d != '__pycache__' and not d.startswith('.')]
        for name in files:
            if name.endswith('.py') and not name.startswith('.'):
                path = os.path.join(directory, name)
                relative = os.path.relpath(path, engine_dir).replace(os.sep, '/')
                found.append((PACKAGE + '/' + relative, path))
    return sorted(found)


def _entry(name):
    info = zipfile.ZipInfo(name, date_time=FIXED_TIME)
    info.compress_type = zipfile.ZIP_STORED
    info.create_system = 3                      # Unix, so that external_attr holds the mode
    info.external_attr = 0o100644 << 16
    return info


def require_engine(engine_dir):
    if not os.path.isfile(os.path.join(engine_dir, ENTRY_MODULE)):
        raise SystemExit(f"build_engine: {engine_dir} is not the engine (it has no {ENTRY_MODULE})")


def write_archive(engine_dir, archive):
    """Write the archive atomically (a node copy never reads a half-written file)."""
    require_engine(engine_dir)
    partial = archive + '.partial'
    with zipfile.ZipFile(partial, 'w') as bundle:
        bundle.writestr(_entry('__main__.py'), MAIN)
        for name, path in engine_files(engine_dir):
            with open(path, 'rb') as handle:
                bundle.writestr(_entry(name), handle.read())
    os.replace(partial, archive)
    return archive


def main(argv):
    if len(argv) not in (1, 2):
        sys.stderr.write("usage: build_engine.py ENGINE_DIR [ARCHIVE]\n")
        return 2
    require_engine(argv[0])
    if len(argv) == 2:
        archive = argv[1]
    else:
        archive = os.path.join(tempfile.mkdtemp(prefix='guestvault-engine-'), ARCHIVE_NAME)
    print(write_archive(argv[0], archive))
    return 0


if __name__ == '__main__':
    sys.exit(main(sys.argv[1:]))
