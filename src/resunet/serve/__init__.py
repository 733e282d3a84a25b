"""Serving a trained model: an HTTP API with dynamic batching (`http`) and a DICOM node (`dicom_node`)."""
