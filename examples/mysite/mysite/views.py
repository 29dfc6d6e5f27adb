"""Views that show what Django concluded about a request behind the gateway."""
import asyncio
import logging

from django.http import HttpResponseBadRequest, JsonResponse

log = logging.getLogger(__name__)


def describe(request):
    return {
        "is_secure": request.is_secure(),
        "host": request.get_host(),
        "absolute_uri": request.build_absolute_uri(),
        "remote_addr": request.META.get("REMOTE_ADDR"),
        "x_forwarded_for": request.META.get("HTTP_X_FORWARDED_FOR"),
    }


def index(request):
    return JsonResponse(describe(request))


async def slow(request):
    """Answers after ?seconds= (at most 30): an in-flight request for drain tests."""
    try:
        seconds = min(float(request.GET.get("seconds", "3")), 30.0)
    except ValueError:
        return HttpResponseBadRequest("seconds must be a number")
    log.info("slow request started: %s s", seconds)
    await asyncio.sleep(seconds)
    return JsonResponse({"slept": seconds, **describe(request)})
