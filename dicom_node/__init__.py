"""The DICOM network side of radialog-node: C-ECHO/C-STORE SCP, durable spool, study assembly.

Modules, one concern each:

* ``policy``   -- which SOP classes and transfer syntaxes we accept, who may associate (AE titles,
  addresses, TLS), limits and timeouts.
* ``spool``    -- durable files: temp write + fsync + atomic rename + directory fsync; start-up recovery.
* ``header``   -- the registry's view of a received header (UIDs, patient columns, ``Instance.attributes``).
* ``store``    -- the C-STORE handler: validate, spool, record, answer (Success only when durable).
* ``selection``-- which image of a study to report (a pure function over ``Instance.attributes``).
* ``assembly`` -- ``StudyAssembler``: RECEIVING -> STABLE -> QUEUED / SKIPPED.
* ``server``   -- ``start_node(settings, registry, enqueue)`` -> ``RunningNode``.
* ``cli``      -- ``radialog node``.
"""
