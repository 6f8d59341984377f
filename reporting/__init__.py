"""Report domain: DICOM SR building (highdicom), report versions, the export outbox, renderings.

``sr`` builds documents, ``versions`` creates report versions in the registry, ``export`` delivers them
to the PACS, ``render`` turns a version into text or JSON for the API.
"""
