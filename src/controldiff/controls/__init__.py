from .tome import ToMe
