"""The entry point of a live restore's NBD server process (restore/live_server.py starts it and
does all of its work): the process opens the storage by its id, as only the run layer can."""
from __future__ import annotations

from ..restore import live_server
from .locate import format_of, require_storage


def main(args):
    def open_storage():
        storage = require_storage(args['config_dir'], args['storage'])
        return storage, format_of(storage)
    return live_server.main(args, open_storage)
