# Thin wrapper over scripts/, CMake and CTest. The two commands a new user needs:
#   make demo   install, build, run the furthest real piece end to end
#   make test   install, build, run the test suite (what CI runs)
.PHONY: all deps build test demo fuzz format check-format clean

BUILD ?= build
CMAKE_FLAGS ?=

all: build

deps:
	scripts/install-deps.sh

# Configure once; later runs only rebuild what changed.
$(BUILD)/build.ninja:
	cmake -S . -B $(BUILD) -G Ninja $(CMAKE_FLAGS)

build: deps $(BUILD)/build.ninja
	cmake --build $(BUILD)

test: deps
	scripts/test.sh

demo: build
	scripts/demo.sh $(BUILD)

fuzz: deps
	scripts/test.sh --only fuzz

format:
	clang-format -i $$(git ls-files '*.h' '*.cc')

check-format:
	scripts/check-format.sh

clean:
	rm -rf build build-asan build-fuzz
