"""Ray glue around the ``gradmem`` core: Ray Train meta-training, Ray Data compression, Ray Serve serving."""
