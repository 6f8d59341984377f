"""The composition: the ``radialog`` command and what puts the parts together (``radialog run``, ``radialog
demo`` and its local chain). It sits on top of every package; nothing imports it (docs/ARCHITECTURE.md)."""
