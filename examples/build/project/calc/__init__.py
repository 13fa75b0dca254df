"""A small calculator package: the project that the build example tests."""
