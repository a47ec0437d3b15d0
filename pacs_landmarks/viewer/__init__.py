"""The OHIF viewer in front of Orthanc: ``make viewer`` (a front end, like ``cli``, ``node`` and ``plugin``).

``ohif`` fetches the pinned ``@ohif/app`` production build with ``npm pack`` and checks its integrity;
``server`` serves it with the app configuration ``app-config.js`` and proxies ``/dicom-web`` to Orthanc's
DICOMweb plugin (same origin, so no CORS set-up in Orthanc).
"""
