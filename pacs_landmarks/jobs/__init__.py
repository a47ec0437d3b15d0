"""Job records, the queue, the worker that runs the pipeline for a job, and result delivery.

Shared by every front end (the standalone node, the Orthanc plugin) so that neither imports the other.
"""
