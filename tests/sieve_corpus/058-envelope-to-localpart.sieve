# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto", "envelope"];
if envelope :localpart :is "to" "bob+lists" {
  fileinto "yes";
} else {
  fileinto "no";
}
