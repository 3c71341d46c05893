"""Applications built on the public vchan API: ``aioxen cat``, ``aioxen bridge``, the demo.

Modules: [`stdio`][aioxen.apps.stdio] (stdin/stdout as async byte streams),
[`embedded`][aioxen.apps.embedded] (a private ``$XEN_ROOT`` with an in-process xenstored),
[`cat`][aioxen.apps.cat] (xencat/unixcat), [`addresses`][aioxen.apps.addresses] and
[`bridge`][aioxen.apps.bridge] (vchan <-> TCP / Unix sockets), [`cli`][aioxen.apps.cli] (the
``cat`` and ``bridge`` subcommands).  See ``docs/apps.md``.
"""
