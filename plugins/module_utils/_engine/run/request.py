"""The shape of every verb: ``run_<verb>(request) -> result``.

Each verb lives in the run/ file named as its module, with a ``<Verb>Request`` dataclass
(subclassing :class:`Request`) whose fields are the module's parameters. A module builds it with
``from_params`` (_ansible.run_module); the node command and the tests build it directly. The
result is the dict the module returns.
"""
from __future__ import annotations

import dataclasses


class Request:
    """A verb's request: a dataclass whose fields are the module's parameters."""

    @classmethod
    def from_params(cls, params, check_mode=False):
        """The request from a module's parameters (an option the request lacks is the
        module's alone, e.g. an alias); ``check_mode`` when the request has one."""
        names = {f.name for f in dataclasses.fields(cls)}
        values = {key: value for key, value in params.items() if key in names}
        if 'check_mode' in names:
            values['check_mode'] = check_mode
        return cls(**values)
