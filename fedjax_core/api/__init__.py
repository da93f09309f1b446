"""The notebook-side API: Federation, FLExperiment and the model/task/data interfaces."""
