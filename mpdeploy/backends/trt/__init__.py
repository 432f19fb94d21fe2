"""TensorRT backend: builder (through Polygraphy), build plan, build report."""
