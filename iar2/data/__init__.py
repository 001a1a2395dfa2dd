"""Image datasets: ImageNet-style ImageFolder and the built-in offline dataset."""
