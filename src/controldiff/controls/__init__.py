from .tome import ToMe
from .deepcache import DeepCache
