"""Region buckets from postal codes, for the top-per-country source.

MovieLens 100K gives a ZIP code per user and no country, so the trainer
derives a coarse "country" bucket from it. The first digit of a US ZIP code is
its USPS national area, and neighbouring areas are merged into regions:

=====  ====================================  ================
digit  USPS national area (states)           region
=====  ====================================  ================
0      CT MA ME NH NJ PR RI VT                ``us-northeast``
1      DE NY PA                              ``us-northeast``
2      DC MD NC SC VA WV                     ``us-southeast``
3      AL FL GA MS TN                        ``us-southeast``
4      IN KY MI OH                           ``us-midwest``
5      IA MN MT ND SD WI                     ``us-midwest``
6      IL KS MO NE                           ``us-midwest``
7      AR LA OK TX                           ``us-south``
8      AZ CO ID NM NV UT WY                  ``us-mountain``
9      AK CA HI OR WA                        ``us-west``
=====  ====================================  ================

A US code is five digits, optionally followed by ``-`` and four more (ZIP+4).
A code that starts letter-digit-letter with a first letter Canada Post uses
(``ABCEGHJKLMNPRSTVXY``) is Canadian, ``ca`` (MovieLens 100K truncates them to
five characters, e.g. ``T8H1N``). Anything else (empty, too short, other
shapes) is ``other``. Case and inner spaces are ignored. For MovieLens 100K
this gives 193 northeast, 163 southeast, 276 midwest, 67 south, 56 mountain,
170 west and 18 ``ca`` users.
"""

from __future__ import annotations

import re

US_REGIONS: tuple[str, ...] = (
    "us-northeast",  # 0
    "us-northeast",  # 1
    "us-southeast",  # 2
    "us-southeast",  # 3
    "us-midwest",  # 4
    "us-midwest",  # 5
    "us-midwest",  # 6
    "us-south",  # 7
    "us-mountain",  # 8
    "us-west",  # 9
)
CANADA = "ca"
OTHER = "other"
#: Every bucket :func:`region_for_postal_code` can return, in a stable order.
REGIONS: tuple[str, ...] = (*dict.fromkeys(US_REGIONS), CANADA, OTHER)

_US_ZIP = re.compile(r"\d{5}(?:-\d{4})?")
_CANADIAN = re.compile(r"[ABCEGHJKLMNPRSTVXY]\d[A-Z]")


def region_for_postal_code(code: str | None) -> str:
    """Maps a postal code to a region bucket (see the module docstring).

    Args:
        code: A US ZIP (``"85711"``, ``"85711-1234"``), a possibly truncated
            Canadian postal code (``"T8H1N"``, ``"K1A 0B1"``), or anything else.

    Returns:
        One of :data:`REGIONS`.
    """
    if not code:
        return OTHER
    s = code.strip().upper().replace(" ", "")
    if _US_ZIP.fullmatch(s):
        return US_REGIONS[int(s[0])]
    if _CANADIAN.match(s):
        return CANADA
    return OTHER
