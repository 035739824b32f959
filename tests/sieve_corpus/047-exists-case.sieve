# envelope: from=alice@example.org to=bob+lists@example.com message=messages/plain.eml
require ["fileinto"];
if exists "LIST-ID" {
  fileinto "yes";
} else {
  fileinto "no";
}
