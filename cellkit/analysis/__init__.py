"""Dataset statistics, metrics beside COCO AP, and error analysis."""
