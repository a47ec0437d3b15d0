/* OHIF 3.13 app configuration served by pacs_landmarks.viewer at /app-config.js (replaces the one in dist/).
 * One data source: Orthanc's DICOMweb plugin, reverse-proxied at /dicom-web on the viewer's own origin. */
window.config = {
  name: 'pacs-landmarks',
  routerBasename: null,
  extensions: [],
  modes: [],
  customizationService: {},
  showStudyList: true,
  // Two-core machines and software WebGL: one decoding worker is enough and keeps memory down.
  maxNumberOfWebWorkers: 1,
  showWarningMessageForCrossOrigin: false,
  showCPUFallbackMessage: false,
  showLoadingIndicator: true,
  strictZSpacingForVolumeViewport: true,
  // Our results are research output: the "investigational use" dialog would cover the viewer at every start.
  investigationalUseDialog: { option: 'never' },
  defaultDataSourceName: 'orthanc',
  dataSources: [
    {
      namespace: '@ohif/extension-default.dataSourcesModule.dicomweb',
      sourceName: 'orthanc',
      configuration: {
        friendlyName: 'Orthanc (pacs-landmarks)',
        name: 'orthanc',
        wadoUriRoot: '/dicom-web',
        qidoRoot: '/dicom-web',
        wadoRoot: '/dicom-web',
        // Orthanc's DICOMweb plugin ignores OHIF's comma-separated includefield; it answers without it.
        qidoSupportsIncludeField: false,
        supportsReject: false,
        imageRendering: 'wadors',
        thumbnailRendering: 'wadors',
        enableStudyLazyLoad: true,
        supportsFuzzyMatching: false,
        supportsWildcard: true,
        omitQuotationForMultipartRequest: true,
        // Debian's DICOMweb plugin writes "localhost" into bulk data URIs; resolving them relative to the
        // study keeps every request on this origin.
        bulkDataURI: { enabled: true, relativeResolution: 'studies' },
      },
    },
  ],
};
