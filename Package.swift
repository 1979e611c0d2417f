// swift-tools-version:6.0
import PackageDescription

let package = Package(
    name: "shmbroker",
    products: [
        .executable(name: "shmbrokerd", targets: ["shmbrokerd"]),
        .executable(name: "shmbrokerctl", targets: ["shmbrokerctl"]),
        .executable(name: "shmbroker-sysload", targets: ["shmbroker-sysload"]),
        .executable(name: "shmbroker-mirror", targets: ["shmbroker-mirror"]),
        // Embed the owner: an application that creates, serves and publishes its own segments.
        .library(name: "ShmBroker", targets: ["ShmBroker"]),
        .library(name: "ShmBrokerClient", targets: ["ShmBrokerClient"]),
        .library(name: "ShmBrokerCore", targets: ["ShmBrokerCore"]),
    ],
    dependencies: [
        .package(url: "https://github.com/apple/swift-argument-parser", from: "1.8.2"),
        .package(url: "https://github.com/apple/swift-log", from: "1.16.2"),
        .package(url: "https://github.com/apple/swift-system", from: "1.8.1"),
        .package(url: "https://github.com/apple/swift-atomics", from: "1.3.0"),
        .package(url: "https://github.com/HdrHistogram/hdrhistogram-swift", from: "0.2.0"),
        .package(url: "https://github.com/apple/swift-metrics", from: "2.13.0"),
        .package(url: "https://github.com/swift-server/swift-prometheus", from: "2.4.1"),
        // `swift package generate-documentation`: the DocC catalogs of ShmBroker and ShmBrokerClient.
        .package(url: "https://github.com/swiftlang/swift-docc-plugin", from: "1.5.0"),
    ],
    targets: [
        // Linux calls Swift cannot see (memfd, seals, CMSG, futex, ucred, epoll, signalfd).
        .target(name: "CShmBrokerShim"),
        // CRC-64 folding with carry-less multiplication (x86-64 intrinsics Swift cannot express).
        .target(name: "CShmBrokerCRC"),
        // The NATS C client (Debian libnats-dev), for shmbroker-mirror only.
        .systemLibrary(
            name: "CNats",
            pkgConfig: "libnats",
            providers: [.apt(["libnats-dev"])]
        ),
        .systemLibrary(
            name: "CSystemd",
            pkgConfig: "libsystemd",
            providers: [.apt(["libsystemd-dev"])]
        ),
        // Typed syscalls: file descriptors, memfds, mappings, sockets with fd passing, epoll, futex.
        .target(
            name: "ShmBrokerPlatform",
            dependencies: [
                "CShmBrokerShim",
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // Segment memory layout, CRC-64/XZ, the lock-free publish/read protocol. No sockets, no policy.
        .target(
            name: "ShmBrokerCore",
            dependencies: [
                "ShmBrokerPlatform", "CShmBrokerCRC", "ShmBrokerProtocol",
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
        // The JSON config: parsing, validation with JSON paths, user and group look-ups.
        .target(name: "ShmBrokerConfig", dependencies: ["ShmBrokerCore", "ShmBrokerPlatform"]),
        // The control-channel wire codec shared by the daemon and every client.
        .target(name: "ShmBrokerProtocol"),
        // The owner: segment registry, access control, the control-socket event loop, reload,
        // systemd glue, and in-process publishing. `shmbrokerd` and embedding applications use it.
        .target(
            name: "ShmBroker",
            dependencies: [
                "ShmBrokerCore", "ShmBrokerProtocol", "ShmBrokerPlatform", "ShmBrokerConfig", "CSystemd",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "CoreMetrics", package: "swift-metrics"),
                .product(name: "Prometheus", package: "swift-prometheus"),
            ]
        ),
        .executableTarget(
            name: "shmbrokerd",
            dependencies: [
                "ShmBroker",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // An example owner: publishes the system load to a segment it owns (a page of code).
        .executableTarget(
            name: "shmbroker-sysload",
            dependencies: [
                "ShmBroker",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // Mirroring segments to other hosts through a NATS JetStream key-value bucket: the value
        // format, heartbeats, staleness, the exporter and the importer (which embeds the owner).
        .target(
            name: "ShmBrokerMirror",
            dependencies: [
                "ShmBroker", "ShmBrokerClient", "ShmBrokerConfig", "ShmBrokerCore", "ShmBrokerPlatform", "CNats",
                .product(name: "Logging", package: "swift-log"),
                .product(name: "Atomics", package: "swift-atomics"),
            ]
        ),
        .executableTarget(
            name: "shmbroker-mirror",
            dependencies: [
                "ShmBrokerMirror",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        .target(
            name: "ShmBrokerClient",
            dependencies: ["ShmBrokerCore", "ShmBrokerProtocol", "ShmBrokerPlatform"]
        ),
        .executableTarget(
            name: "shmbrokerctl",
            dependencies: [
                "ShmBrokerClient", "ShmBrokerConfig",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ]
        ),
        // The benchmark suite: `swift run -c release shmbroker-bench` (not part of `swift test`).
        .executableTarget(
            name: "shmbroker-bench",
            dependencies: [
                "ShmBroker", "ShmBrokerClient", "ShmBrokerCore", "ShmBrokerPlatform", "ShmBrokerProtocol",
                .product(name: "Atomics", package: "swift-atomics"),
                .product(name: "Logging", package: "swift-log"),
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
                .product(name: "Histogram", package: "hdrhistogram-swift"),
                .product(name: "SystemPackage", package: "swift-system"),
            ]
        ),
        // A helper executable the integration tests spawn as readers, writers and attackers.
        .executableTarget(
            name: "shmbroker-testkit",
            dependencies: [
                "ShmBrokerClient", "ShmBrokerPlatform", "ShmBrokerCore", "ShmBrokerProtocol",
                .product(name: "ArgumentParser", package: "swift-argument-parser"),
            ],
            path: "Tests/ShmBrokerTestKit"
        ),
        // Fuzz harnesses for the frame decoder and the config loader (Tests/ShmBrokerFuzz/fuzz.sh
        // links them into libFuzzer fuzzers), and an executable that replays inputs through them.
        .target(
            name: "ShmBrokerFuzzHarness",
            dependencies: ["ShmBrokerConfig", "ShmBrokerProtocol"],
            path: "Tests/ShmBrokerFuzzHarness"
        ),
        .executableTarget(
            name: "shmbroker-fuzz",
            dependencies: ["ShmBrokerFuzzHarness"],
            path: "Tests/ShmBrokerFuzz",
            exclude: ["fuzz.sh"]
        ),
        .testTarget(name: "ShmBrokerCoreTests", dependencies: [
            "ShmBrokerCore", "ShmBrokerPlatform", .product(name: "SystemPackage", package: "swift-system"),
            .product(name: "Atomics", package: "swift-atomics"),
        ]),
        .testTarget(name: "ShmBrokerProtocolTests", dependencies: ["ShmBrokerProtocol", "ShmBrokerCore"]),
        .testTarget(name: "ShmBrokerConfigTests", dependencies: ["ShmBrokerConfig"]),
        .testTarget(name: "ShmBrokerTests", dependencies: ["ShmBroker", "ShmBrokerClient", "ShmBrokerProtocol"]),
        .testTarget(name: "ShmBrokerMirrorTests", dependencies: ["ShmBrokerMirror", "ShmBrokerConfig", "ShmBrokerCore"]),
        .testTarget(
            name: "ShmBrokerIntegrationTests",
            dependencies: ["ShmBrokerClient", "ShmBrokerCore", "ShmBrokerPlatform", "ShmBrokerProtocol", "shmbroker-testkit",
                           "shmbroker-sysload"]
        ),
    ],
    swiftLanguageModes: [.v6]
)
