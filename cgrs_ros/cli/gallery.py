"""``cgrs gallery``: make galleries: the bundled demo world, or tiles of a GeoTIFF."""

import argparse
import time


def _progress_bar(total, desc):
    from tqdm import tqdm
    # disable=None hides the bar when stderr is not a terminal (logs, CI).
    return tqdm(total=total, desc=desc, unit='img', disable=None, leave=False)


def run_demo(args):
    """Generate the deterministic demo world gallery."""
    from cgrs_ros.engine.demo_world import generate_demo_world
    from cgrs_ros.engine.geo import Datum

    datum = Datum(*args.datum) if args.datum else None
    start = time.perf_counter()
    total = args.size * (1 + args.drone_views)
    with _progress_bar(total, 'rendering') as bar:
        kwargs = {'datum': datum} if datum else {}
        summary = generate_demo_world(
            args.out, seed=args.seed, size=args.size, drone_views=args.drone_views,
            force=args.force, progress=lambda n: bar.update(n - bar.n), **kwargs)
    elapsed = time.perf_counter() - start
    print(f'wrote {summary.images} images of {summary.places} places '
          f'({summary.side_m / 1000:.2f} km town around {summary.datum.lat:.5f}, '
          f'{summary.datum.lon:.5f}) to {summary.out_dir} in {elapsed:.1f} s')
    print(f'manifest {summary.out_dir / "gallery.csv"}; {summary.queries} evaluation queries '
          f'in {summary.out_dir / "queries.csv"}; places in {summary.out_dir / "world.json"}')
    if args.orthophoto:
        from cgrs_ros.engine.demo.scene import load_scene, write_orthophoto
        start = time.perf_counter()
        path = summary.out_dir / 'orthophoto.tif'
        width, height = write_orthophoto(load_scene(summary.out_dir), path,
                                         m_per_px=args.orthophoto, seed=args.seed)
        print(f'orthophoto {path}: {width}x{height} px at {args.orthophoto} m/px in '
              f'{time.perf_counter() - start:.1f} s; tile it for localization with `cgrs '
              f'gallery from-geotiff {path} OUT --overlap 0.75 --alt {summary.datum.alt}`')
    return 0


def run_from_geotiff(args):
    """Cut a GeoTIFF into a tiled gallery."""
    from cgrs_ros.engine.orthomosaic import count_tiles, tile_geotiff

    start = time.perf_counter()
    try:
        total = count_tiles(args.raster, args.tile_size, args.overlap)
    except Exception:  # tile_geotiff reports the problem with a proper message
        total = None
    with _progress_bar(total, 'tiling') as bar:
        summary = tile_geotiff(args.raster, args.out, tile_size=args.tile_size,
                               overlap=args.overlap, platform=args.platform, alt=args.alt,
                               max_nodata=args.max_nodata, force=args.force,
                               progress=bar.update)
    elapsed = time.perf_counter() - start
    print(f'wrote {summary.tiles} tiles of {summary.tile_size} px (stride {summary.stride} px, '
          f'{summary.skipped_nodata} no-data tiles skipped, CRS {summary.crs}) to '
          f'{summary.out_dir} in {elapsed:.1f} s')
    return 0


def _fraction(text):
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f'{text!r} is not a number; give a fraction such as 0.25') from None


def register(subparsers):
    """Add the ``gallery`` subcommand group (``demo``, ``from-geotiff``)."""
    parser = subparsers.add_parser('gallery', help='make a gallery (demo world, GeoTIFF tiles)')
    sub = parser.add_subparsers(dest='gallery_command', metavar='ACTION')
    parser.set_defaults(func=lambda args: parser.print_help() or 2)

    demo = sub.add_parser(
        'demo', help='generate the deterministic synthetic demo town',
        description='Render a geo-referenced synthetic town: per place one north-up '
                    'satellite tile and oblique drone views, three descriptions per image, '
                    'held-out queries (queries.csv) and the places (world.json).')
    demo.add_argument('out', metavar='OUT', help='output gallery folder')
    demo.add_argument('--seed', type=int, default=0, help='random seed (default 0)')
    demo.add_argument('--size', type=int, default=160,
                      help='number of places (default 160: 160 satellite + 320 drone images)')
    demo.add_argument('--drone-views', type=int, default=2,
                      help='drone views per place (default 2)')
    demo.add_argument('--datum', type=float, nargs=3, metavar=('LAT', 'LON', 'ALT'),
                      help='centre of the town, WGS84 degrees and ellipsoidal metres '
                           '(default 47.3977 8.5456 488)')
    demo.add_argument('--orthophoto', type=float, nargs='?', const=0.5, default=None,
                      metavar='M_PER_PX',
                      help='also write OUT/orthophoto.tif, the whole town as a north-up '
                           'GeoTIFF (default 0.5 m/px, the resolution of the satellite tiles), to '
                           'tile with from-geotiff for camera localization')
    demo.add_argument('--force', action='store_true', help='overwrite a gallery in OUT')
    demo.set_defaults(func=run_demo)

    geotiff = sub.add_parser(
        'from-geotiff', help='cut a GeoTIFF orthomosaic into a tiled gallery',
        description='Tile a geo-referenced raster with windowed reads; each tile gets the '
                    'WGS84 lat/lon of its centre; mostly no-data tiles are skipped.')
    geotiff.add_argument('raster', metavar='ORTHO.tif', help='geo-referenced raster')
    geotiff.add_argument('out', metavar='OUT', help='output gallery folder')
    geotiff.add_argument('--tile-size', type=int, default=256, metavar='PX',
                         help='tile width and height in pixels (default 256)')
    geotiff.add_argument('--overlap', type=_fraction, default=0.0, metavar='F',
                         help='fraction of a tile shared with its neighbour (default 0)')
    geotiff.add_argument('--platform', default='satellite',
                         choices=('satellite', 'drone', 'ground'),
                         help='platform written to the manifest (default satellite)')
    geotiff.add_argument('--alt', type=float, default=0.0, metavar='M',
                         help='altitude (m above the WGS84 ellipsoid) for every tile '
                              '(default 0: unknown)')
    geotiff.add_argument('--max-nodata', type=_fraction, default=0.5, metavar='F',
                         help='skip tiles with a larger no-data fraction (default 0.5)')
    geotiff.add_argument('--force', action='store_true', help='overwrite a gallery in OUT')
    geotiff.set_defaults(func=run_from_geotiff)
