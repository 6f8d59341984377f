"""What the node accepts and from whom: SOP classes, transfer syntaxes, AE titles, addresses, TLS.

Accepted storage classes are the ones a chest radiograph can arrive in:

* CR Image Storage, DX Image Storage for Presentation and for Processing (the modalities we report);
* Secondary Capture (single frame, and the multi-frame grayscale byte/word classes) because scanned
  films and some PACS exports arrive that way; the image choice ranks them below CR/DX.

Deliberately *not* accepted: the DX mammography and DX intra-oral classes. Their SOP class alone says
"not a chest", so negotiating them would only fill the spool with images we must skip; a sender gets a
clear presentation-context rejection instead. Every other SOP class (CT, MR, ...) is refused the same way.
"""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import Iterable, Sequence

from pydicom.uid import (
    JPEG2000,
    ComputedRadiographyImageStorage,
    DeflatedExplicitVRLittleEndian,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    JPEG2000Lossless,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
    RLELossless,
    SecondaryCaptureImageStorage,
)
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]  # made at import by pynetdicom

from radialog.settings import TLSSettings

#: Storage SOP classes a chest X-ray may arrive in (see module docstring for what is left out and why).
STORAGE_CLASSES: tuple[str, ...] = (
    ComputedRadiographyImageStorage,
    DigitalXRayImageStorageForPresentation,
    DigitalXRayImageStorageForProcessing,
    SecondaryCaptureImageStorage,
    MultiFrameGrayscaleByteSecondaryCaptureImageStorage,
    MultiFrameGrayscaleWordSecondaryCaptureImageStorage,
)

#: SOP classes that are never reported directly but may be (CR and DX first).
SECONDARY_CAPTURE_CLASSES = frozenset(STORAGE_CLASSES[3:])

#: Transfer syntaxes modalities and archives send for radiographs; data are stored as received.
TRANSFER_SYNTAXES: tuple[str, ...] = (
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    DeflatedExplicitVRLittleEndian,
    JPEGBaseline8Bit,
    JPEGExtended12Bit,
    JPEGLossless,
    JPEGLosslessSV1,
    JPEGLSLossless,
    JPEGLSNearLossless,
    JPEG2000Lossless,
    JPEG2000,
    RLELossless,
)

VERIFICATION_CLASS = Verification

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(entries: Iterable[str]) -> list[Network]:
    """Turn settings' address allow-list entries ('10.0.0.5', '10.1.0.0/16', '::1') into networks."""
    return [ipaddress.ip_network(entry.strip(), strict=False) for entry in entries if entry.strip()]


def address_allowed(address: str, networks: Sequence[Network]) -> bool:
    """True when ``networks`` is empty (no restriction) or ``address`` lies in one of them."""
    if not networks:
        return True
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip.version == net.version and ip in net for net in networks)


def server_ssl_context(tls: TLSSettings) -> ssl.SSLContext:
    """A TLS 1.2+ server context for DICOM TLS; client certificates are required when configured."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.load_cert_chain(certfile=str(tls.certfile), keyfile=str(tls.keyfile))
    if tls.ca_file is not None:
        context.load_verify_locations(cafile=str(tls.ca_file))
    context.verify_mode = ssl.CERT_REQUIRED if tls.require_client_cert else ssl.CERT_NONE
    return context
