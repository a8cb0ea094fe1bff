"""The tamper-evident audit trail (format feature ``audit-v1``): who opened,
wrote, renamed and deleted which file, when, in sealed, hash-chained
segments under ``STORE/audit/`` (:mod:`.segments`: the byte layout;
:mod:`.trail`: the writer; :mod:`.check`: listing and verification)."""
