"""Small model definitions for the tests: real architectures' kernel shapes, parameter
names and einsum strings, at sizes that run in milliseconds on a CPU."""
