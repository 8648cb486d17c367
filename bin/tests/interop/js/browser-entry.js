// Bundled by esbuild for the browser tests: JsSIP and the shared phone scripts as globals.
window.JsSIP = require('jssip');
window.runPhone = require('./phone').run;
window.runMedia = require('./media').runMedia;
