"""Settings of the example app: examples/django_settings.py (copied in as
gatehouse_settings.py by the Dockerfile) plus what any Django project has."""
import os
from pathlib import Path

from .gatehouse_settings import *  # noqa: F401,F403

BASE_DIR = Path(__file__).resolve().parent.parent

# An example, not a deployment: a real project reads its key from a secret.
SECRET_KEY = os.environ.get("DJANGO_SECRET_KEY", "example-only-not-secret")
DEBUG = False

INSTALLED_APPS = [
    "django.contrib.staticfiles",
    "channels",
]
MIDDLEWARE = [
    "django.middleware.security.SecurityMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
]
ROOT_URLCONF = "mysite.urls"
TIME_ZONE = "UTC"
STATICFILES_DIRS = [BASE_DIR / "static"]

LOGGING = {
    "version": 1,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "root": {"handlers": ["console"], "level": "INFO"},
}
