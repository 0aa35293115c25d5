"""OpenCV, imported in one place so that its thread pool is always off.

cv2 kernels here run on one image inside a DataLoader worker or a finishing thread: the
parallelism is ours (workers, threads), and OpenCV's own pool would oversubscribe the cores and
does not survive the workers' fork. Import it as `from lesionseg.data.cv import cv2`.
"""

import cv2

cv2.setNumThreads(0)

__all__ = ["cv2"]
