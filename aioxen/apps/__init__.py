"""Applications built on the public vchan API: ``aioxen cat``, ``aioxen bridge``, the demo.

Modules: :mod:`~aioxen.apps.stdio` (stdin/stdout as async byte streams),
:mod:`~aioxen.apps.embedded` (a private ``$XEN_ROOT`` with an in-process xenstored),
:mod:`~aioxen.apps.cat` (xencat/unixcat), :mod:`~aioxen.apps.addresses` and
:mod:`~aioxen.apps.bridge` (vchan <-> TCP / Unix sockets), :mod:`~aioxen.apps.cli` (the
``cat`` and ``bridge`` subcommands).  See ``docs/apps.md``.
"""
